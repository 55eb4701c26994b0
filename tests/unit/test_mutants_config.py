"""Tests that kill mutants left alive by the other unit tests (docs/testing.md, "Mutation testing").

Expected values are worked out by hand from the formulas in the DecaySchedule docstring
(and the published schedules they cite), never taken from the code under test.
"""

import math

import pytest
import torch
from pydantic import ValidationError

from shardema.config import (
    FACTOR_MATCH_TOLERANCE,
    DecaySchedule,
    EMAConfig,
    check_factors,
    check_model_paths,
    factors_match,
)


# ---------------------------------------------------------------------- schedules
@pytest.mark.parametrize("n, expected", [(0, 1 / 10), (5, 6 / 15), (90, 91 / 100), (10**6, 0.99)])
def test_warmup_is_one_plus_n_over_ten_plus_n_capped_by_the_factor(n, expected):
    assert DecaySchedule(kind="warmup").decay(0.99, n) == pytest.approx(expected, rel=1e-12)


def test_power_uses_inv_gamma_and_power():
    s = DecaySchedule(kind="power", inv_gamma=2.0, power=0.5)
    assert s.decay(0.999, 6) == pytest.approx(0.5, rel=1e-12)  # 1 - (1 + 6/2) ** -0.5 = 1 - 1/2
    assert s.decay(0.999, 0) == 0.0  # 1 - 1 ** -0.5
    assert DecaySchedule(kind="power", inv_gamma=1.0, power=1.0).decay(0.999, 3) == pytest.approx(0.75)


def test_power_capped_by_a_smaller_factor():
    s = DecaySchedule(kind="power", inv_gamma=1.0, power=1.0)
    assert s.decay(0.5, 3) == 0.5  # min(0.5, 1 - 1/4)


def test_half_life_counts_firings_plus_one_plus_step_bias():
    s = DecaySchedule(kind="half_life", half_life_fraction=0.5, step_bias=1)
    # step 3: 3 firings before, m = 3 + 1 + 1 = 5, decay = 2 ** (-1 / 2.5)
    assert s.decay(0.9999, 3) == pytest.approx(2 ** (-0.4), rel=1e-12)
    # a large negative bias clamps m at 1: 2 ** (-1 / 0.5) = 0.25
    neg = DecaySchedule(kind="half_life", half_life_fraction=0.5, step_bias=-100)
    assert neg.decay(0.9999, 3) == pytest.approx(0.25, rel=1e-12)
    # m = 0 + 1 + 0 = 1 on the first call
    assert DecaySchedule(kind="half_life", half_life_fraction=1.0).decay(0.9999, 0) == pytest.approx(0.5)
    # capped by the factor
    assert DecaySchedule(kind="half_life", half_life_fraction=1.0).decay(0.3, 0) == pytest.approx(0.3)


def test_edm_half_life_in_samples_with_and_without_rampup():
    s = DecaySchedule(kind="edm", half_life_samples=100.0)
    assert s.decay(0.9999, 7, samples=50.0) == pytest.approx(0.5**0.5, rel=1e-12)
    assert s.decay(0.9999, 7, samples=200.0) == pytest.approx(0.25, rel=1e-12)
    assert s.decay(0.6, 7, samples=50.0) == pytest.approx(0.6)  # min(0.6, 0.707)
    r = DecaySchedule(kind="edm", half_life_samples=100.0, rampup_ratio=0.1)
    # h = min(100, 200 * 0.1) = 20: 0.5 ** (50 / 20)
    assert r.decay(0.9999, 7, samples=50.0, samples_seen=200.0) == pytest.approx(0.5**2.5, rel=1e-12)
    # h = min(100, 5000 * 0.1) = 100
    assert r.decay(0.9999, 7, samples=50.0, samples_seen=5000.0) == pytest.approx(0.5**0.5, rel=1e-12)
    # nothing seen yet: h = 0, floored at 1e-8 samples: the first firing copies
    assert r.decay(0.9999, 0, samples=1e-8, samples_seen=0.0) == pytest.approx(0.5, rel=1e-6)
    assert r.decay(0.9999, 0, samples=50.0, samples_seen=0.0) == 0.0


def test_swa_is_n_over_n_plus_one_of_the_firings_and_ignores_min_decay():
    s = DecaySchedule(kind="swa", start_step=2, update_every=3, min_decay=0.9)
    # firings at steps 2, 5, 8: 0, 1 and 2 firings before them
    assert [s.decay(0.5, step) for step in (2, 5, 8)] == [0.0, 0.5, pytest.approx(2 / 3)]


def test_min_decay_is_a_floor():
    s = DecaySchedule(kind="warmup", min_decay=0.5)
    assert s.decay(0.99, 0) == 0.5  # max(0.1, 0.5)
    assert s.decay(0.99, 90) == pytest.approx(0.91)  # above the floor


def test_first_update_copies_only_the_first_firing():
    s = DecaySchedule(kind="constant", first_update_copies=True, start_step=3, update_every=2)
    assert s.decay(0.9, 3) == 0.0
    assert s.decay(0.9, 5) == 0.9
    assert DecaySchedule(kind="constant").decay(0.9, 0) == 0.9


@pytest.mark.parametrize("count, n", [("calls", 7), ("firings", 3)])
def test_n_counts_calls_or_firings_after_start_step(count, n):
    # start 2, every 3: firings at 2, 5, 8, 11; the call at 9 is 7 calls after start, after 3 firings
    s = DecaySchedule(kind="warmup", start_step=2, update_every=3, count=count)
    assert s.decay(0.999, 9) == pytest.approx((1 + n) / (10 + n), rel=1e-12)


def test_calls_before_start_step_count_as_zero():
    s = DecaySchedule(kind="warmup", start_step=5)
    assert s.decay(0.999, 2) == pytest.approx(0.1)


@pytest.mark.parametrize("step, tracking, update", [
    (0, True, False), (3, True, False), (4, False, True), (5, False, False), (6, False, False),
    (7, False, True), (10, False, True), (11, False, False),
])
def test_tracking_and_update_steps_at_the_boundaries(step, tracking, update):
    s = DecaySchedule(start_step=4, update_every=3)
    assert s.is_tracking(step) is tracking
    assert s.is_update_step(step) is update


@pytest.mark.parametrize("step, fired", [(0, 0), (4, 0), (5, 1), (7, 1), (8, 2), (10, 2), (11, 3)])
def test_firings_before_is_a_ceiling_division(step, fired):
    assert DecaySchedule(start_step=4, update_every=3).firings_before(step) == fired


def test_ignored_options_per_kind():
    assert DecaySchedule().ignored_options() == []
    assert DecaySchedule(kind="warmup", inv_gamma=2.0, power=0.5).ignored_options() == ["inv_gamma", "power"]
    assert DecaySchedule(kind="power", inv_gamma=2.0, power=0.5).ignored_options() == []
    assert DecaySchedule(kind="power", step_bias=3).ignored_options() == ["step_bias"]
    assert DecaySchedule(kind="half_life", half_life_fraction=0.1, step_bias=2).ignored_options() == []
    assert DecaySchedule(kind="edm", half_life_samples=10.0, rampup_ratio=0.05,
                         samples_per_update=4).ignored_options() == []
    assert DecaySchedule(kind="constant", half_life_samples=10.0, rampup_ratio=0.05, samples_per_update=4,
                         half_life_fraction=0.2).ignored_options() == [
        "half_life_fraction", "half_life_samples", "rampup_ratio", "samples_per_update"]
    assert DecaySchedule(kind="swa", min_decay=0.5).ignored_options() == ["min_decay"]
    assert DecaySchedule(kind="warmup", min_decay=0.5).ignored_options() == []


def test_kind_options_are_required():
    with pytest.raises(ValidationError, match="half_life_fraction"):
        DecaySchedule(kind="half_life")
    with pytest.raises(ValidationError, match="half_life_samples"):
        DecaySchedule(kind="edm")


# ---------------------------------------------------------------------- factors and paths
def test_factors_match_is_inclusive_at_the_tolerance():
    assert factors_match(0.5, 0.5 + FACTOR_MATCH_TOLERANCE / 2)
    assert factors_match(0.5 + FACTOR_MATCH_TOLERANCE / 2, 0.5)
    assert not factors_match(0.5, 0.5 + 4 * FACTOR_MATCH_TOLERANCE)
    assert not factors_match(0.5 + 4 * FACTOR_MATCH_TOLERANCE, 0.5)


def test_check_factors_keeps_order_and_accepts_one_number():
    assert check_factors([0.9999, 0.999]) == (0.9999, 0.999)
    assert check_factors(0.9) == (0.9,)
    assert check_factors((0.5,)) == (0.5,)
    assert check_factors([0.5, 0.5 + 1e-9]) == (0.5, 0.5 + 1e-9)


@pytest.mark.parametrize("bad, message", [
    (True, "must be a decay"), ("0.9", "must be a decay"), (b"x", "must be a decay"), ({0.9}, "must be a decay"),
    ([True], "not a number"), (["0.9"], "not a number"), ([], "empty"),
    ([0.0], "outside"), ([1.0], "outside"), ([1], "outside"), ([-0.5], "outside"), ([math.nan], "outside"),
    ([0.9, 0.99, 0.9], r"\[0.9\] are given more than once"),
    ([0.5, 0.5 + 1e-13], "lookups cannot tell them apart"),
])
def test_check_factors_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        check_factors(bad)


def test_close_factors_message_names_both():
    with pytest.raises(ValueError) as info:
        check_factors([0.5 + 1e-13, 0.5])
    assert "0.5 and 0.5000000000001 differ by 1e-13, less than 1e-12" in str(info.value)


def test_check_model_paths_accepts():
    assert check_model_paths(None) == (None,)
    assert check_model_paths("enc") == ("enc",)
    assert check_model_paths(["a", "ab", "b.c", "a_b"]) == ("a", "ab", "b.c", "a_b")
    assert check_model_paths([None]) == (None,)
    assert check_model_paths(["X", "aX", "Xb.cX"]) == ("X", "aX", "Xb.cX")  # strip(".") strips dots only


@pytest.mark.parametrize("bad, message", [
    (3, "must be None"), ([], "empty"), ([""], "not a dotted"), ([".a"], "not a dotted"), (["a."], "not a dotted"),
    (["a..b"], "not a dotted"), (["a b"], "not a dotted"), (["a\tb"], "not a dotted"), ([3], "not a dotted"),
    (["a", "a"], "overlap"), (["a", "a.b"], "overlap"), (["a.b", "a"], "overlap"), ([None, "a"], "overlap"),
    (["a", None], "overlap"), (["x", "a", "a.b"], "overlap"),
])
def test_check_model_paths_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        check_model_paths(bad)


def test_overlap_message_names_the_whole_model():
    with pytest.raises(ValueError, match=r"None \(the whole model\) and 'a' overlap"):
        check_model_paths([None, "a"])
    with pytest.raises(ValueError, match=r"'a' and None \(the whole model\) overlap"):
        check_model_paths(["a", None])


# ---------------------------------------------------------------------- EMAConfig
def test_renamed_options_name_the_new_name():
    with pytest.raises(ValidationError, match="'scratch_bytes' was renamed to 'exchange_buffer_bytes'"):
        EMAConfig(target_factors=[0.9], scratch_bytes=10)
    with pytest.raises(ValidationError, match="'upcast_scratch_bytes' was renamed to 'upcast_buffer_bytes'"):
        EMAConfig(target_factors=[0.9], upcast_scratch_bytes=10)


def test_flat_schedule_options_join_the_schedule():
    cfg = EMAConfig(target_factors=[0.9], schedule="power", power=0.5, update_every=2)
    assert cfg.schedule == DecaySchedule(kind="power", power=0.5, update_every=2)
    cfg = EMAConfig(target_factors=[0.9], start_step=3)
    assert cfg.schedule == DecaySchedule(kind="constant", start_step=3)
    cfg = EMAConfig(target_factors=[0.9], schedule=DecaySchedule(kind="warmup", start_step=1), update_every=4)
    assert cfg.schedule == DecaySchedule(kind="warmup", start_step=1, update_every=4)
    cfg = EMAConfig(target_factors=[0.9], schedule={"kind": "warmup"}, min_decay=0.2)
    assert cfg.schedule == DecaySchedule(kind="warmup", min_decay=0.2)
    assert EMAConfig(target_factors=[0.9], schedule="swa").schedule == DecaySchedule(kind="swa")


def test_an_option_flat_and_inside_is_refused():
    with pytest.raises(ValidationError, match="power, update_every given both flat and inside schedule"):
        EMAConfig(target_factors=[0.9], schedule={"kind": "power", "power": 0.5, "update_every": 2},
                  update_every=3, power=0.7)


def test_a_bad_schedule_with_flat_options_is_reported_by_field_validation():
    with pytest.raises(ValidationError, match="schedule"):
        EMAConfig(target_factors=[0.9], schedule=3, update_every=2)


def test_patterns():
    cfg = EMAConfig(target_factors=[0.9], include="*.w", exclude=["a", "b*"])
    assert cfg.include == ("*.w",)
    assert cfg.exclude == ("a", "b*")
    assert EMAConfig(target_factors=[0.9]).include is None
    for bad in ([""], [" "], [3], 3):
        with pytest.raises(ValidationError, match="non-empty fnmatch patterns"):
            EMAConfig(target_factors=[0.9], exclude=bad)


@pytest.mark.parametrize("given, name, dtype", [
    (None, "live", None), (torch.float32, "float32", torch.float32), (torch.float64, "float64", torch.float64),
    (torch.bfloat16, "bfloat16", torch.bfloat16), (torch.float16, "float16", torch.float16),
    ("float16", "float16", torch.float16), ("live", "live", None),
])
def test_shadow_dtype(given, name, dtype):
    cfg = EMAConfig(target_factors=[0.9], shadow_dtype=given)
    assert cfg.shadow_dtype == name
    assert cfg.torch_shadow_dtype == dtype


def test_a_non_float_shadow_dtype_is_refused_listing_the_choices():
    with pytest.raises(ValidationError, match=r"\['float32', 'float64', 'bfloat16', 'float16'\] or 'live'"):
        EMAConfig(target_factors=[0.9], shadow_dtype=torch.int32)


def test_defaults():
    cfg = EMAConfig(target_factors=0.9)
    assert cfg.model_paths == (None,)
    assert cfg.upcast_buffer_bytes == 32 * 2**20
    assert cfg.exchange_buffer_bytes == 64 * 2**20
    assert cfg.chunk_numel == 2**18
    assert cfg.buffers == "copy"
    assert cfg.include_frozen is True
    s = DecaySchedule()
    assert (s.kind, s.inv_gamma, s.power, s.update_every, s.start_step, s.min_decay, s.count,
            s.first_update_copies) == ("constant", 1.0, 2 / 3, 1, 0, 0.0, "calls", False)


def test_edm_defaults_are_no_samples_and_nothing_seen():
    # samples defaults to 0: 0.5 ** 0 = 1, so the factor itself
    assert DecaySchedule(kind="edm", half_life_samples=1.0).decay(0.9, 3) == 0.9
    # samples_seen defaults to 0: the ramped half-life is the 1e-8 floor, so any sample copies
    ramped = DecaySchedule(kind="edm", half_life_samples=10.0, rampup_ratio=1.0)
    assert ramped.decay(0.9, 3, samples=1.0) == 0.0


def test_factors_exactly_the_tolerance_apart_match():
    assert factors_match(0.0, FACTOR_MATCH_TOLERANCE)  # |0 - 1e-12| == 1e-12 exactly in binary


def test_a_plain_config_is_its_own_ema_config():
    cfg = EMAConfig(target_factors=[0.9])
    assert cfg.to_ema_config() is cfg


def test_a_missing_attribute_error_carries_its_name_and_object_also_for_subclasses():
    from torch import nn

    import shardema

    class MyEMA(shardema.ShardedEMA):
        pass

    ema = MyEMA(nn.Linear(2, 2), [0.9])
    with pytest.raises(AttributeError, match=r"^'MyEMA' object has no attribute 'nope'$") as info:
        _ = ema.nope
    assert info.value.name == "nope" and info.value.obj is ema  # what Python's "Did you mean" hints read
    with torch.no_grad(), pytest.raises(AttributeError, match="renamed to 'exchange_buffer_bytes'") as info:
        with ema.swapped(0.9) as swap:
            _ = swap.scratch_bytes
    assert info.value.name == "scratch_bytes" and info.value.obj is swap


def _gamma_by_bisection(sigma_rel: float) -> float:
    """gamma >= 0 with sigma_rel**2 == (gamma + 1) / ((gamma + 2)**2 (gamma + 3)) (EDM2, eq. 3), solved here."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > sigma_rel**2:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize(("start_step", "update_every", "steps_and_t"), [
    (0, 1, [(0, 1), (1, 2), (5, 6), (99, 100)]),
    (3, 2, [(3, 1), (5, 2), (6, 3), (11, 5)]),  # t counts firings from 1: the first one copies
])
def test_power_function_decays_follow_the_profile_of_each_sigma_rel(start_step, update_every, steps_and_t):
    schedule = DecaySchedule(kind="power_function", start_step=start_step, update_every=update_every)
    for sigma_rel in (0.05, 0.1):
        gamma = _gamma_by_bisection(sigma_rel)
        for step, t in steps_and_t:
            assert schedule.decay(sigma_rel, step) == pytest.approx((1 - 1 / t) ** (gamma + 1), rel=1e-9, abs=0)


@pytest.mark.parametrize(("given", "factors"), [
    ({"sigma_rels": [0.05, 0.1]}, (0.05, 0.1)),
    ({"sigma_rels": 0.05}, (0.05,)),  # one number
    ({"sigma_rels": [0.05], "target_factors": [0.05]}, (0.05,)),  # both, agreeing
    ({"target_factors": [0.05, 0.1], "schedule": "power_function"}, (0.05, 0.1)),  # factors as profiles
])
def test_sigma_rels_name_the_averages_of_a_power_function_ema(given, factors):
    config = EMAConfig(**given)
    assert config.target_factors == factors and config.sigma_rels == factors
    assert config.schedule.kind == "power_function"


@pytest.mark.parametrize(("given", "message"), [
    ({"sigma_rels": "0.05"}, "sigma_rels='0.05' must be a non-empty list of relative widths, e.g. [0.05, 0.10]"),
    ({"sigma_rels": []}, "sigma_rels=[] must be a non-empty list of relative widths"),
    ({"sigma_rels": True}, "sigma_rels=True must be a non-empty list of relative widths"),
    ({"sigma_rels": [0.05, 0.9]}, "sigma_rel 0.9 is outside (0, 0.2887)"),
    ({"sigma_rels": [0.05], "target_factors": [0.9]}, "give sigma_rels=[0.05] or target_factors=[0.9], not both"),
    ({"target_factors": [0.9], "schedule": "power_function"}, "sigma_rel 0.9 is outside (0, 0.2887)"),
])
def test_bad_sigma_rels_name_the_value(given, message):
    with pytest.raises(ValidationError) as info:
        EMAConfig(**given)
    assert message in str(info.value)


def test_a_power_function_schedule_uses_no_other_option():
    assert DecaySchedule(kind="power_function").ignored_options() == []
    assert DecaySchedule(kind="power_function", inv_gamma=2.0).ignored_options() == ["inv_gamma"]


@pytest.mark.parametrize(("options", "message"), [
    ({"kind": "half_life"}, "kind 'half_life' needs half_life_fraction, e.g. 0.1 (a tenth of the run so far)"),
    ({"kind": "edm"}, "kind 'edm' needs half_life_samples, e.g. 500_000 (EDM's 500 kimg)"),
    ({"kind": "power_function", "min_decay": 0.5}, "kind 'power_function' takes neither min_decay, "
     "first_update_copies nor count: its decays are fixed by the profile (time counts firings; the first one copies)"),
    ({"kind": "power_function", "first_update_copies": True}, "kind 'power_function' takes neither min_decay"),
    ({"kind": "power_function", "count": "firings"}, "kind 'power_function' takes neither min_decay"),
])
def test_options_a_kind_needs_or_refuses_are_named_in_the_whole_message(options, message):
    with pytest.raises(ValidationError) as info:
        DecaySchedule(**options)
    assert f"Value error, {message}" in str(info.value)


@pytest.mark.parametrize(("schedule", "kind"), [
    ("constant", "'constant'"), ({"kind": "warmup"}, "'warmup'"), ({"update_every": 2}, "'constant'"),
    (DecaySchedule(kind="power"), "'power'"), (3, "None"),  # not a schedule at all
])
def test_sigma_rels_refuse_another_schedule_naming_it(schedule, kind):
    with pytest.raises(ValidationError) as info:
        EMAConfig(sigma_rels=[0.05], schedule=schedule)
    assert f"sigma_rels needs schedule 'power_function' (it is {kind}); leave schedule unset" in str(info.value)


def test_sigma_rels_keep_the_other_options_of_a_power_function_schedule():
    config = EMAConfig(sigma_rels=[0.05], schedule={"kind": "power_function", "update_every": 2})
    assert config.schedule.update_every == 2 and config.target_factors == (0.05,)


def test_every_renamed_option_is_named_in_one_message():
    with pytest.raises(ValidationError) as info:
        EMAConfig(target_factors=[0.9], upcast_scratch_bytes=1, scratch_bytes=2)
    assert ("option 'upcast_scratch_bytes' was renamed to 'upcast_buffer_bytes'; option 'scratch_bytes' was renamed "
            "to 'exchange_buffer_bytes'") in str(info.value)
