"""Every LerpPlan variant, on CPU tensors, against the float64 loop ``lerp_loop_reference``.

The device plan (one sequence of foreach calls, used on accelerators) is built here from CPU
tensors with ``layout="device"``, so CI, which has no accelerator, runs it. Each case updates
the shadows several times while the live tensors change in place (a plan reads their current
values) and the weights change (the cached weight lists are rebuilt), and compares every
shadow with the float64 reference after every call.
"""

from __future__ import annotations

import pytest
import torch

import shardema._kernels as kernels
from shardema._kernels import LerpPlan, lerp_loop_reference

# Small shapes with odd sizes, an empty tensor and a 0-dim one; one tensor larger than the
# chunk sizes used below so it is cut into several chunks / scratch batches.
SHAPES = [(7, 3), (1,), (0, 4), (), (300,), (2, 2, 2), (33, 5)]
LAYOUTS = ["cpu", "device"]
# (live dtype, shadow dtype): matching or mixed
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)]
WEIGHTS = {1: [[0.1], [0.37], [0.37]], 3: [[0.1, 0.01, 0.5], [0.2, 0.9, 0.05], [0.2, 0.9, 0.05]]}


def _tolerance(shadow_dtype: torch.dtype) -> dict:
    # Within a few roundings, in the shadow dtype, of inputs of magnitude < 8 (a lerp whose result
    # nearly cancels keeps the absolute error of its inputs); a wrong weight is off by far more.
    return {torch.float32: dict(rtol=3e-7, atol=2e-6), torch.float64: dict(rtol=1e-15, atol=4e-15),
            torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2)}[shadow_dtype]


def _make(shapes, num_factors, live_dtype, shadow_dtype, *, contiguous=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lives = []
    for s in shapes:
        if contiguous or len(s) < 2:
            lives.append(torch.randn(s, generator=g).to(live_dtype))
        else:  # a transposed view: same shape, not contiguous
            lives.append(torch.randn(tuple(reversed(s)), generator=g).to(live_dtype).transpose(0, -1))
    shadows = [[torch.randn(s, generator=g).to(shadow_dtype) for s in shapes] for _ in range(num_factors)]
    return lives, shadows


def _check_against_reference(plan, lives, shadows, weights_per_call, shadow_dtype, seed=1):
    expected = [[s.clone() for s in row] for row in shadows]
    g = torch.Generator().manual_seed(seed)
    for call, weights in enumerate(weights_per_call):
        plan.lerp(weights)
        lerp_loop_reference(expected, lives, weights)
        for k, (row, ref_row) in enumerate(zip(shadows, expected)):
            for i, (got, ref) in enumerate(zip(row, ref_row)):
                assert got.dtype == shadow_dtype
                torch.testing.assert_close(got, ref, **_tolerance(shadow_dtype),
                                           msg=lambda m, k=k, i=i, c=call: f"call {c}, factor {k}, tensor {i}: {m}")
                ref.copy_(got)  # the next call starts from the same shadow on both sides
        with torch.no_grad():  # the live tensors change in place: the plan must read them again
            for live in lives:
                live.add_(torch.randn(live.shape, generator=g).to(device=live.device, dtype=live.dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("live_dtype,shadow_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("num_factors", [1, 3])
@pytest.mark.parametrize("chunk_numel", [1 << 18, 7], ids=["whole", "chunked"])
def test_every_plan_variant_equals_the_float64_loop(layout, live_dtype, shadow_dtype, num_factors, chunk_numel):
    lives, shadows = _make(SHAPES, num_factors, live_dtype, shadow_dtype)
    mixed = live_dtype != shadow_dtype
    # a scratch smaller than the largest tensor: several upcast batches per call
    scratch = torch.empty(40, dtype=shadow_dtype) if mixed else None
    plan = LerpPlan(shadows, lives, chunk_numel=chunk_numel, scratch=scratch, layout=layout)
    assert plan.layout == layout
    _check_against_reference(plan, lives, shadows, WEIGHTS[num_factors], shadow_dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_factors", [1, 3])
def test_a_scratch_larger_than_everything_gives_one_upcast_batch(layout, num_factors):
    lives, shadows = _make(SHAPES, num_factors, torch.bfloat16, torch.float32)
    plan = LerpPlan(shadows, lives, chunk_numel=1 << 18, scratch=torch.empty(1 << 16), layout=layout)
    _check_against_reference(plan, lives, shadows, WEIGHTS[num_factors], torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_factors", [1, 3])
@pytest.mark.parametrize("live_dtype,shadow_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_non_contiguous_live_tensors_with_matching_dtypes(layout, num_factors, live_dtype, shadow_dtype):
    lives, shadows = _make(SHAPES, num_factors, live_dtype, shadow_dtype, contiguous=False)
    assert not all(live.is_contiguous() for live in lives)
    plan = LerpPlan(shadows, lives, chunk_numel=5, scratch=None, layout=layout)
    _check_against_reference(plan, lives, shadows, WEIGHTS[num_factors], shadow_dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_shadows_are_updated_whole(layout):
    lives, _ = _make(SHAPES, 2, torch.float32, torch.float32)
    g = torch.Generator().manual_seed(5)
    shadows = [[torch.randn(tuple(reversed(s)), generator=g).transpose(0, -1) if len(s) >= 2 else torch.randn(s)
                for s in SHAPES] for _ in range(2)]
    plan = LerpPlan(shadows, lives, chunk_numel=5, scratch=None, layout=layout)
    _check_against_reference(plan, lives, shadows, [[0.3, 0.6], [0.01, 0.99]], torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_low_precision_live_with_fp32_shadows_is_refused(layout):
    lives, shadows = _make([(6, 4)], 1, torch.bfloat16, torch.float32, contiguous=False)
    with pytest.raises(NotImplementedError, match="non-contiguous"):
        LerpPlan(shadows, lives, chunk_numel=1 << 18, scratch=torch.empty(64), layout=layout)


@pytest.mark.parametrize("layout", ["auto", *LAYOUTS])
def test_mixed_dtypes_need_a_scratch_and_bad_layouts_are_refused(layout):
    lives, shadows = _make([(4,)], 1, torch.float16, torch.float32)
    with pytest.raises(AssertionError, match="scratch"):
        LerpPlan(shadows, lives, chunk_numel=8, scratch=None, layout=layout)
    with pytest.raises(ValueError, match="layout='gpu'"):
        LerpPlan(shadows, lives, chunk_numel=8, scratch=torch.empty(4), layout="gpu")


def test_auto_layout_picks_the_cpu_plan_for_cpu_tensors():
    lives, shadows = _make([(4,)], 1, torch.float32, torch.float32)
    assert LerpPlan(shadows, lives, chunk_numel=8, scratch=None).layout == "cpu"
    assert LerpPlan([[]], [], chunk_numel=8, scratch=None).layout == "device"  # nothing to update: either works


@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_factors", [1, 3])
def test_cpu_plan_worker_shares_and_whole_tensors(monkeypatch, live_dtype, num_factors):
    """Several worker shares (pool threads) and, for one factor in fp32, whole-tensor updates."""
    monkeypatch.setattr(kernels, "MIN_PARALLEL_NUMEL", 1)
    monkeypatch.setattr(kernels, "CPU_WHOLE_NUMEL", 200)
    monkeypatch.setattr(kernels, "CPU_PIECE_NUMEL", 16)
    monkeypatch.setattr(kernels, "CPU_BATCH_NUMEL", 32)
    monkeypatch.setattr(kernels.torch, "get_num_threads", lambda: 3)
    lives, shadows = _make(SHAPES, num_factors, live_dtype, torch.float32)
    lives = [live.requires_grad_() if live.is_floating_point() else live for live in lives]
    scratch = torch.empty(3 * 32) if live_dtype != torch.float32 else None
    plan = LerpPlan(shadows, lives, chunk_numel=1 << 18, scratch=scratch, layout="cpu")
    assert len(plan._runs) == 3
    assert bool(plan._inline) == (num_factors == 1 and live_dtype == torch.float32)  # (300,) goes whole
    lives = [live.detach() for live in lives]  # the reference and the in-place changes use the same storage
    _check_against_reference(plan, lives, shadows, WEIGHTS[num_factors], torch.float32)
    assert all(s.grad_fn is None for row in shadows for s in row)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("live_dtype,shadow_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("num_factors", [1, 3])
def test_copy_sets_every_shadow_to_its_live_tensor(layout, live_dtype, shadow_dtype, num_factors):
    lives, shadows = _make(SHAPES, num_factors, live_dtype, shadow_dtype)
    scratch = torch.empty(40, dtype=shadow_dtype) if live_dtype != shadow_dtype else None
    plan = LerpPlan(shadows, lives, chunk_numel=7, scratch=scratch, layout=layout)
    for _ in range(2):
        plan.copy()
        for row in shadows:
            for got, live in zip(row, lives):
                assert got.dtype == shadow_dtype
                assert torch.equal(got, live.to(shadow_dtype))
        with torch.no_grad():
            for live in lives:
                live.mul_(-2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_handles_non_contiguous_live_tensors(layout):
    lives, shadows = _make(SHAPES, 2, torch.float32, torch.float32, contiguous=False)
    LerpPlan(shadows, lives, chunk_numel=5, scratch=None, layout=layout).copy()
    for row in shadows:
        for got, live in zip(row, lives):
            assert torch.equal(got, live)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has none; the CPU cases run both plans)")
@pytest.mark.parametrize("layout", ["auto", "device"])
@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_factors", [1, 3])
def test_plans_on_cuda_tensors_equal_the_float64_loop(layout, live_dtype, num_factors):
    lives, shadows = _make(SHAPES, num_factors, live_dtype, torch.float32)
    lives = [live.cuda() for live in lives]
    shadows = [[s.cuda() for s in row] for row in shadows]
    scratch = torch.empty(40, device="cuda") if live_dtype != torch.float32 else None
    plan = LerpPlan(shadows, lives, chunk_numel=7, scratch=scratch, layout=layout)
    assert plan.layout == "device"
    _check_against_reference(plan, lives, shadows, WEIGHTS[num_factors], torch.float32)
    torch.cuda.synchronize()


@pytest.mark.parametrize("layout", ["cpu", "device"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("sizes", [[5, 7], [1 << 20, 40_000, 3, 70_001], [(1 << 21) + 5]])
def test_exchange_swaps_every_element_through_the_scratch(threads, sizes, layout):
    """The swap's CPU exchange: pieces split over threads, every element exchanged exactly once."""
    from shardema._kernels import exchange_

    generator = torch.Generator().manual_seed(sum(sizes))
    a = [torch.randn(n, generator=generator) for n in sizes]
    b = [torch.randn(n, generator=generator) for n in sizes]
    scratch = [torch.empty(n) for n in sizes]
    a0, b0 = [t.clone() for t in a], [t.clone() for t in b]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        exchange_(scratch, a, b, layout)
    finally:
        torch.set_num_threads(previous)
    for x, y, x0, y0 in zip(a, b, a0, b0):
        assert torch.equal(x, y0) and torch.equal(y, x0)


def _carved(storage: torch.Tensor, shapes, gaps=()):
    """Views of ``storage`` with the given shapes, one after the other (``gaps``: skip an element before these)."""
    views, offset = [], 0
    for i, shape in enumerate(shapes):
        offset += 1 if i in gaps else 0
        numel = torch.Size(shape).numel()
        views.append(storage[offset:offset + numel].view(shape))
        offset += numel
    return views


def _plan_tensors(plan) -> int:
    return sum(len(b.selfs) for batches in [plan._inline, *plan._runs] for b in batches)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("live_dtype,shadow_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16-fp32"])
@pytest.mark.parametrize("num_factors", [1, 3])
def test_storage_neighbours_are_updated_as_one_tensor(layout, live_dtype, shadow_dtype, num_factors):
    """Live tensors carved from one flat buffer: runs of neighbours become one view, values as the loop."""
    shapes = [(7, 3), (5,), (0, 4), (), (40,), (2, 2, 2), (6,), (33, 5)]
    g = torch.Generator().manual_seed(0)
    flat_live = torch.randn(400, generator=g).to(live_dtype)
    # a gap before tensor 4 ends the first run; tensor 6 lives in its own storage
    lives = _carved(flat_live, shapes, gaps=(4,))
    lives[6] = torch.randn(6, generator=g).to(live_dtype)
    flat_shadow = torch.randn(num_factors, 400, generator=g).to(shadow_dtype)
    shadows = [_carved(flat_shadow[k], shapes) for k in range(num_factors)]
    untouched = flat_shadow[:, 246:].clone()  # after the last shadow: a run must not spill into it
    scratch = torch.empty(1024, dtype=shadow_dtype) if live_dtype != shadow_dtype else None  # one batch
    plan = LerpPlan(shadows, lives, chunk_numel=1 << 18, scratch=scratch, layout=layout)
    # runs: [0, 1, 3] (the empty tensor 2 is skipped), [4, 5], [6], [7]
    assert _plan_tensors(plan) == 4 * num_factors
    _check_against_reference(plan, lives, shadows, WEIGHTS[num_factors], shadow_dtype)
    plan.copy()
    for k in range(num_factors):
        for shadow, live in zip(shadows[k], lives):
            torch.testing.assert_close(shadow, live.to(shadow_dtype), rtol=0, atol=0)
    assert torch.equal(flat_shadow[:, 246:], untouched)


def test_a_run_of_neighbours_is_cut_into_cpu_pieces(monkeypatch):
    """A coalesced run longer than a CPU piece is cut like any big tensor, over several workers."""
    monkeypatch.setattr(kernels, "MIN_PARALLEL_NUMEL", 1)
    monkeypatch.setattr(kernels, "CPU_PIECE_NUMEL", 16)
    monkeypatch.setattr(kernels.torch, "get_num_threads", lambda: 2)
    shapes = [(5, 3)] * 6 + [(4,)] * 3
    g = torch.Generator().manual_seed(2)
    lives = _carved(torch.randn(200, generator=g), shapes)
    shadows = [_carved(torch.randn(200, generator=g), shapes) for _ in range(3)]
    plan = LerpPlan(shadows, lives, chunk_numel=1 << 18, scratch=None, layout="cpu")
    assert len(plan._runs) == 2 and _plan_tensors(plan) == 3 * 7  # 102 elements: 7 pieces of <= 16
    _check_against_reference(plan, lives, shadows, WEIGHTS[3], torch.float32)
