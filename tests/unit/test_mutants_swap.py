"""Tests that kill mutants of ``_swap.py`` left alive by test_swap_unit.py (docs/testing.md, "Mutation testing").

Expected values come from the swap's documented contract (the module notes and the
docstrings of ``SwapWriteError`` and ``SwapInfo``), worked out by hand.
"""

import logging
import pickle

import pytest
import torch
from torch import nn

import shardema
from shardema import ShardedEMA, SwapWriteError


def _net(layers: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(2, 2) for _ in range(layers))).to(dtype)


def _write_error(model: nn.Module, ema: ShardedEMA, written) -> SwapWriteError:
    with pytest.raises(SwapWriteError) as info:
        with ema.swapped(0.9):
            with torch.no_grad():
                for p in written:
                    p.mul_(2)
    return info.value


def test_swap_write_error_pickles_with_its_message_and_names():
    err = SwapWriteError("the body wrote", ["a.weight", "b.bias"])
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is SwapWriteError and str(again) == "the body wrote" and again.fqns == ("a.weight", "b.bias")


def test_a_cpu_swap_keeps_no_backup_on_the_host():
    model = _net(1, torch.bfloat16)
    ema = ShardedEMA(model, [0.9])  # bf16 live, fp32 shadows: backed up, on the CPU itself
    with ema.swapped(0.9) as info:
        pass
    assert info.mode == "backup" and info.backup_on_host is False


@pytest.mark.parametrize(("count", "shown"), [
    (5, "model:0.weight, model:0.bias, model:1.weight, model:1.bias, model:2.weight; "),
    (6, "model:0.weight, model:0.bias, model:1.weight, model:1.bias, model:2.weight and 1 more; "),
    (8, "model:0.weight, model:0.bias, model:1.weight, model:1.bias, model:2.weight and 3 more; "),
])
def test_the_write_error_names_five_parameters_then_counts_the_rest(count, shown):
    model = _net(4)
    ema = ShardedEMA(model, [0.9])
    params = list(model.parameters())[:count]
    err = _write_error(model, ema, params)
    assert f"wrote to swapped parameter(s) {shown}the live weights were restored" in str(err)
    assert len(err.fqns) == count


def test_the_write_error_names_the_model_path():
    model = _net(2)
    ema = ShardedEMA(model, [0.9], model_paths=["1"])
    err = _write_error(model, ema, [model[1].weight])
    assert "wrote to swapped parameter(s) 1:weight; " in str(err) and err.fqns == ("weight",)


def test_the_write_error_says_an_exchanged_parameter_s_ema_holds_the_written_values():
    model = _net(1)  # float32 live and shadows: exchanged in place
    ema = ShardedEMA(model, [0.9])
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    ema.reset_to_live()
    err = _write_error(model, ema, [model[0].weight])
    assert str(err) == (
        "the body of `with ema.swapped(0.9)` wrote to swapped parameter(s) model:0.weight; the live weights were "
        "restored, and their EMA now holds the values written in the block (the in-place exchange keeps no copy). "
        "Evaluate without writing (no optimizer step, no in-place ops on parameters), or pass keep_changes=True "
        "to make the written values the EMA on purpose")
    assert torch.equal(ema.shadow(0.9, (None, "0.weight")), torch.tensor([[2.0, 4.0], [6.0, 8.0]]))


def test_the_write_error_says_a_backed_up_parameter_s_writes_were_discarded():
    model = _net(1, torch.bfloat16)  # bf16 live, fp32 shadows: backed up
    ema = ShardedEMA(model, [0.9])
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    ema.reset_to_live()
    err = _write_error(model, ema, [model[0].weight])
    assert str(err).endswith(
        "the live weights were restored, and those writes were discarded and the EMA is unchanged. Evaluate without "
        "writing (no optimizer step, no in-place ops on parameters), or pass keep_changes=True to make the written "
        "values the EMA on purpose")
    assert torch.equal(ema.shadow(0.9, (None, "0.weight")), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert shardema.EMAState.IDLE is ema.state


def test_a_failure_before_the_swap_in_leaves_the_live_weights_alone(monkeypatch):
    from shardema._swap import _Swap

    model = _net(1, torch.bfloat16)  # backed up: restoring would copy the (unwritten) backup
    ema = ShardedEMA(model, [0.9])
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def info(self, factor, model_paths):
        raise RuntimeError("simulated failure before the swap-in")

    monkeypatch.setattr(_Swap, "info", info)
    with pytest.raises(RuntimeError, match="simulated failure before"):
        with ema.swapped(0.9):
            pytest.fail("the body must not run")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert ema.state is shardema.EMAState.IDLE


def test_a_one_byte_exchange_buffer_still_fits_the_widest_element():
    """float64 then float32 tensors, each alone in its dtype: the scratch must hold one float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2, bias=False).double(), nn.Linear(2, 1, bias=False))
    ema = ShardedEMA(model, [0.9], shadow_dtype="live")  # shadows in the live dtypes: both exchanged
    w64 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    w32 = torch.tensor([[5.0, 6.0]])
    with torch.no_grad():
        model[0].weight.copy_(w64)
        model[1].weight.copy_(w32)
    ema.reset_to_live()
    with torch.no_grad():
        model[0].weight.add_(10)
        model[1].weight.add_(10)
    with ema.swapped(0.9, exchange_buffer_bytes=1) as info:
        assert info.mode == "in_place" and info.exchange_buffer_bytes == 8  # one float64 element
        assert torch.equal(model[0].weight, w64) and torch.equal(model[1].weight, w32)
    assert torch.equal(model[0].weight, w64 + 10) and torch.equal(model[1].weight, w32 + 10)
    assert torch.equal(ema.shadow(0.9, (None, "0.weight")), w64)


def _records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("shardema") and r.levelno == level]


def test_a_swap_logs_its_factor_and_what_it_holds_at_debug_level(caplog):
    model = _net(1)
    ema = ShardedEMA(model, [0.9, 0.99])
    with caplog.at_level(logging.DEBUG, logger="shardema"), ema.swapped(0.99) as info:
        pass
    assert f"swapped in EMA factor 0.99: {info}" in _records(caplog, logging.DEBUG)


@pytest.mark.parametrize("body_fails", [False, True])
def test_a_failing_restore_is_logged_and_raised_unless_the_body_failed_first(monkeypatch, caplog, body_fails):
    from shardema._swap import _Swap

    model = _net(1)
    ema = ShardedEMA(model, [0.9])

    def give_back(self, keep_changes):
        raise RuntimeError("simulated restore failure")

    monkeypatch.setattr(_Swap, "_give_back", give_back)
    expected = ValueError("the body failed") if body_fails else RuntimeError("simulated restore failure")
    with caplog.at_level(logging.ERROR, logger="shardema"), pytest.raises(type(expected), match=str(expected)):
        with ema.swapped(0.9):
            if body_fails:
                raise ValueError("the body failed")
    assert _records(caplog, logging.ERROR) == [
        "restoring the live weights after the swap of factor 0.9 failed: RuntimeError('simulated restore failure')"]


def test_a_swap_refused_at_entry_restores_nothing_and_logs_no_error(caplog):
    model = _net(2)
    ema = ShardedEMA(model, [0.9])
    model[1] = nn.Linear(2, 2)  # a replaced submodule: refused before anything is swapped
    refused = pytest.raises(RuntimeError, match="submodule '1' was replaced")
    with caplog.at_level(logging.ERROR, logger="shardema"), refused, ema.swapped(0.9):
        pytest.fail("the body must not run")
    assert _records(caplog, logging.ERROR) == []


def test_a_failure_of_the_only_rank_carries_no_note_about_other_ranks():
    model = _net(1)
    ema = ShardedEMA(model, [0.9])
    with pytest.raises(ValueError, match="the body failed") as info:
        with ema.swapped(0.9):
            raise ValueError("the body failed")
    assert not getattr(info.value, "__notes__", None)
