"""Every schedule kind and option against its closed form, value for value; copy_to; name filters; warnings."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import shardema
from shardema import DecaySchedule, EMAConfig, ShardedEMA


def _live(step: int) -> torch.Tensor:
    """The live weight at ``step``: changes every call, so every decay leaves a trace."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(7, generator=gen, dtype=torch.float64)


def _run(schedule: dict, steps: int, factors=(0.99, 0.9), samples=None):
    """shardema's EMA (float64 shadows) of a weight that changes every call."""
    model = nn.Linear(7, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(_live(-1))
    ema = ShardedEMA(model, EMAConfig(target_factors=factors, shadow_dtype="float64", schedule=schedule))
    for step in range(steps):
        with torch.no_grad():
            model.weight.copy_(_live(step))
        ema.update(num_samples=None if samples is None else samples(step))
    return {f: ema.shadow(f, (None, "weight")).view(-1) for f in factors}, ema


def _replay(decay_of, steps: int, factors=(0.99, 0.9), update_every=1, start_step=0, hold=False):
    """The same EMA as a float64 loop, with the decay of each firing given by ``decay_of(f, call, firing)``;
    calls before ``start_step`` copy the live weights, or with ``hold`` leave the shadow alone."""
    out = {}
    for f in factors:
        shadow = _live(-1).clone()
        firing = 0
        for call in range(steps):
            live = _live(call)
            if call < start_step:
                if not hold:
                    shadow = live.clone()
            elif (call - start_step) % update_every == 0:
                d = decay_of(f, call, firing)
                shadow = d * shadow + (1 - d) * live
                firing += 1
        out[f] = shadow
    return out


def _assert_same(ours, expected):
    for f in expected:
        torch.testing.assert_close(ours[f], expected[f], rtol=0, atol=1e-12)


STEPS = 300


def test_half_life_closed_form_with_step_bias_and_update_every():
    schedule = dict(kind="half_life", half_life_fraction=0.2, step_bias=5, update_every=3, count="firings")
    ours, _ = _run(schedule, STEPS, factors=(0.9999, 0.97))
    expected = _replay(lambda f, call, firing: min(f, 2 ** (-1 / (0.2 * max(1, firing + 1 + 5)))), STEPS,
                       factors=(0.9999, 0.97), update_every=3)
    _assert_same(ours, expected)


def test_edm_half_life_in_samples_with_rampup_is_batch_size_invariant():
    def edm(f, samples, seen, half_life=2000.0, ratio=0.05):
        h = min(half_life, seen * ratio)
        return min(f, 0.5 ** (samples / max(h, 1e-8)))

    batch = lambda step: 16 + (step % 5)  # noqa: E731 - a varying batch size
    schedule = dict(kind="edm", half_life_samples=2000.0, rampup_ratio=0.05)
    ours, ema = _run(schedule, STEPS, factors=(0.9999,), samples=batch)
    seen = [sum(batch(s) for s in range(call)) for call in range(STEPS)]
    expected = _replay(lambda f, call, firing: edm(f, batch(call), seen[call]), STEPS, factors=(0.9999,))
    _assert_same(ours, expected)
    assert ema.samples_seen == sum(batch(s) for s in range(STEPS))
    with pytest.raises(ValueError, match="num_samples"):
        ema.update()
    # With update_every the samples of the skipped calls count at the next firing.
    ours, _ = _run(dict(schedule, update_every=4), 40, factors=(0.9999,), samples=batch)
    expected = _replay(lambda f, call, firing: edm(f, sum(batch(c) for c in range(call - 3, call + 1) if c >= 0),
                                                   seen[call - 3] if call >= 3 else 0), 40, factors=(0.9999,),
                       update_every=4)
    _assert_same(ours, expected)


def test_swa_is_the_equal_average_of_the_firings():
    ours, _ = _run(dict(kind="swa", update_every=2, start_step=3), 41, factors=(0.5,))
    firings = [_live(c) for c in range(3, 41) if (c - 3) % 2 == 0]
    torch.testing.assert_close(ours[0.5], torch.stack(firings).mean(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("count", ["calls", "firings"])
def test_min_decay_and_the_age_count_with_update_every(count):
    schedule = dict(kind="power", power=0.75, inv_gamma=2.0, min_decay=0.5, update_every=3, start_step=4,
                    count=count)

    def power(f, call, firing):
        n = firing if count == "firings" else call - 4
        return max(min(f, 1 - (1 + n / 2.0) ** -0.75), 0.5)

    ours, _ = _run(schedule, STEPS)
    _assert_same(ours, _replay(power, STEPS, update_every=3, start_step=4))


@pytest.mark.parametrize("kind", ["half_life", "edm"])
def test_min_decay_floors_half_life_and_edm(kind):
    """Both start with decays far below the floor (a short half-life so far; a ramped-up half-life of
    few samples), so the floor decides the first firings and the kind's own decay the later ones."""
    floor = 0.6
    if kind == "half_life":
        schedule = dict(kind="half_life", half_life_fraction=0.2, min_decay=floor, update_every=2)

        def raw(f, call, firing):
            return min(f, 2 ** (-1 / (0.2 * max(1, firing + 1))))
        samples = None
    else:
        schedule = dict(kind="edm", half_life_samples=400.0, rampup_ratio=0.5, min_decay=floor)

        def raw(f, call, firing):
            return min(f, 0.5 ** (8 / max(min(400.0, 8 * call * 0.5), 1e-8)))
        samples = lambda step: 8  # noqa: E731
    every = schedule.get("update_every", 1)
    decays = [raw(0.99, call, call // every) for call in range(0, STEPS, every)]
    assert min(decays) < floor < max(decays)  # the floor binds early and lets go later
    ours, _ = _run(schedule, STEPS, samples=samples)
    expected = _replay(lambda f, call, firing: max(raw(f, call, firing), floor), STEPS, update_every=every)
    _assert_same(ours, expected)
    unfloored = _replay(raw, STEPS, update_every=every)
    assert not torch.allclose(unfloored[0.99], expected[0.99])  # the floor changed the result


def test_before_start_hold_keeps_the_initial_weights_until_the_first_firing():
    schedule = dict(kind="warmup", start_step=5, update_every=2, before_start="hold")
    decay = lambda f, call, firing: min(f, (1 + call - 5) / (10 + call - 5))  # noqa: E731
    ours, ema = _run(schedule, 4)
    assert ema.current_decays() == {0.99: 1.0, 0.9: 1.0}  # held, not copied
    _assert_same(ours, {f: _live(-1) for f in (0.99, 0.9)})  # still the weights it was created with
    ours, ema = _run(schedule, STEPS)
    _assert_same(ours, _replay(decay, STEPS, update_every=2, start_step=5, hold=True))
    copied = _replay(decay, STEPS, update_every=2, start_step=5)
    assert not torch.allclose(_run(dict(schedule, before_start="copy"), 6)[0][0.9],
                              _run(schedule, 6)[0][0.9])  # the first firing averages in different weights
    _assert_same(_run(dict(schedule, before_start="copy"), STEPS)[0], copied)
    cfg = EMAConfig(target_factors=[0.9], start_step=3, before_start="hold")  # flat, like every schedule option
    assert cfg.schedule.before_start == "hold" and EMAConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValueError, match="before_start"):
        DecaySchedule(before_start="keep")


def test_first_update_copies_also_with_update_every():
    ours, _ = _run(dict(kind="warmup", first_update_copies=True, update_every=2), 51)
    expected = _replay(lambda f, call, firing: 0.0 if firing == 0 else min(f, (1 + call) / (10 + call)), 51,
                       update_every=2)
    _assert_same(ours, expected)


def test_diffusers_default_warmup_is_first_update_copies():
    """diffusers EMAModel.get_decay without use_ema_warmup: step = optimization_step - update_after_step - 1;
    decay 0 when step <= 0, else min(decay, (1 + step) / (10 + step)), then max(min_decay)."""

    def diffusers(f, call):
        step = max(0, call + 1 - 0 - 1)
        return 0.0 if step <= 0 else max(min(f, (1 + step) / (10 + step)), 0.0)

    ours, _ = _run(dict(kind="warmup", first_update_copies=True), STEPS)
    _assert_same(ours, _replay(lambda f, call, firing: diffusers(f, call), STEPS))


def test_schedule_options_round_trip_and_are_validated():
    cfg = EMAConfig(target_factors=[0.9], schedule="edm", half_life_samples=1e6, rampup_ratio=0.05,
                    samples_per_update=256, min_decay=0.1)
    assert EMAConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValueError, match="needs half_life_fraction"):
        DecaySchedule(kind="half_life")
    with pytest.raises(ValueError, match="needs half_life_samples"):
        DecaySchedule(kind="edm")
    with pytest.raises(ValueError, match="min_decay"):
        DecaySchedule(min_decay=1.0)


def test_sample_counters_survive_save_and_resume(tmp_path):
    schedule = dict(kind="edm", half_life_samples=500.0, rampup_ratio=0.1, update_every=2)
    _, ema = _run(schedule, 7, factors=(0.999,), samples=lambda s: 10)
    ema.save(tmp_path, "latest")
    fresh = ShardedEMA(nn.Linear(7, 1, bias=False).double(), EMAConfig(target_factors=[0.999], shadow_dtype="float64",
                                                                       schedule=schedule))
    assert fresh.resume(tmp_path) == "latest"
    assert fresh.counters() == ema.counters() == {"samples_seen": 70.0, "samples_pending": 0.0}
    state = ema.state_dict()
    assert state["samples_seen"] == 70.0


# ---------------------------------------------------------------------------- copy_to, name filters, warnings
def test_copy_to_leaves_the_ema_in_the_model_for_good():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    ema = ShardedEMA(model, [0.9, 0.5])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    ema.copy_to(0.5, model_paths=None)
    for t in ema.tracked():
        assert torch.equal(t.local(), ema.shadow(0.5, t.key).to(torch.bfloat16)), t.fqn
    shadows = {t.key: ema.shadow(0.9, t.key).clone() for t in ema.tracked()}
    ema.update()  # the EMA goes on from its own shadows
    for t in ema.tracked():
        expected = 0.9 * shadows[t.key] + 0.1 * t.local().float()
        torch.testing.assert_close(ema.shadow(0.9, t.key), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not one of this EMA's target factors"):
        ema.copy_to(0.7)


def test_copy_to_a_subset_of_model_paths_leaves_the_others_live():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = ShardedEMA(model, [0.9, 0.5], model_paths=["0", "1"])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.copy_to(0.5, model_paths=["1"])
    for name in ("1.weight", "1.bias"):  # 0.5 * start + 0.5 * (start + 1), independently of the shadows
        torch.testing.assert_close(model.get_parameter(name), start[name] + 0.5, rtol=0, atol=1e-6)
    for name in ("0.weight", "0.bias"):
        assert torch.equal(model.get_parameter(name), live[name]), name
    with pytest.raises(ValueError, match="'2'"):
        ema.copy_to(0.5, model_paths=["2"])


def test_include_and_exclude_patterns_choose_tensors_by_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    ema = ShardedEMA(model, [0.9], exclude=["*.bias", "1.*"])
    assert sorted(t.fqn for t in ema.tracked()) == ["0.weight", "2.weight"]
    ema = ShardedEMA(model, [0.9], include=["2.*"])
    assert sorted(t.fqn for t in ema.tracked()) == ["2.bias", "2.weight"]
    with pytest.raises(ValueError, match=r"include pattern\(s\) \['3.\*'\] match no tracked tensor"):
        ShardedEMA(model, [0.9], include=["2.*", "3.*"])
    with pytest.raises(ValueError, match=r"^exclude pattern\(s\) \['\*.Bias'\] match no tracked tensor.*e.g. "
                                         r"0.weight, 0.bias"):
        ShardedEMA(model, [0.9], exclude=["1.*", "*.Bias"])  # case-sensitive: a typo is an error, not a no-op
    with pytest.raises(ValueError, match="no parameters to average"):
        ShardedEMA(model, [0.9], exclude=["*"])


def test_warnings_where_peers_warn(caplog):
    model = nn.Linear(3, 2)
    with caplog.at_level(logging.WARNING, logger="shardema"):
        ShardedEMA(model, [0.9999, 0.9], shadow_dtype="bfloat16")
    assert "bfloat16 shadows" in caplog.text and "[0.9999]" in caplog.text
    caplog.clear()
    # float16 resolves 2**-10 ~ 9.8e-4: 1 - 0.9995 is below it, 1 - 0.999 is not (bfloat16 would flag both).
    with caplog.at_level(logging.WARNING, logger="shardema"):
        ShardedEMA(model, [0.9995, 0.999], shadow_dtype="float16")
    assert "float16 shadows (resolution 0.000977) with decay [0.9995]" in caplog.text
    assert "bfloat16" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardema"):
        ShardedEMA(model, [0.9], schedule="warmup", power=0.75)
    assert "schedule kind 'warmup' ignores power" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardema"):
        ShardedEMA(model, [0.9999])
    assert caplog.text == ""


def test_current_decays_match_the_schedule():
    _, ema = _run(dict(kind="half_life", half_life_fraction=0.5), 3, factors=(0.9999,))
    assert ema.current_decays()[0.9999] == pytest.approx(2 ** (-1 / (0.5 * 4)))
    assert math.isclose(shardema.DecaySchedule(kind="swa").decay(0.9, 10), 10 / 11)
