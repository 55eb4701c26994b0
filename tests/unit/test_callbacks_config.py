"""Callback configs: the seed's YAML, malformed configs, the kind registry, the loader."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

import shardema.callbacks as cbs
from shardema.callbacks import (
    CallbackConfig,
    EmaCallbackConfig,
    OfflineLossCallbackConfig,
    PeriodicCallback,
    PeriodicCallbackConfig,
    load_callback_configs,
    register_callback,
)

SEED_YAML = """
- kind: shardema.callbacks.EmaCallback
  every_n_epochs: 10
  save_weights: false
  save_last_weights: false
  save_latest_weights: true
  target_factors:
    - 0.9999
  name: EmaCallback
  eval_callbacks:
    - kind: OfflineLossCallback
      every_n_epochs: 1
      dataset_key: val
"""


def test_the_seed_example_loads_with_our_kind():
    (config,) = load_callback_configs(SEED_YAML)
    assert isinstance(config, EmaCallbackConfig)
    assert config.kind == "EmaCallback" and config.name == "EmaCallback"
    assert config.every_n_epochs == 10 and config.every_n_updates is None and config.every_n_samples is None
    assert (config.save_weights, config.save_last_weights, config.save_latest_weights) == (False, False, True)
    assert config.target_factors == (0.9999,)
    (child,) = config.eval_callbacks
    assert isinstance(child, OfflineLossCallbackConfig)
    assert (child.kind, child.every_n_epochs, child.dataset_key) == ("OfflineLossCallback", 1, "val")


def test_the_seed_example_loads_from_a_file_and_round_trips(tmp_path):
    path = tmp_path / "callbacks.yaml"
    path.write_text(SEED_YAML)
    from_path = load_callback_configs(path)
    from_str_path = load_callback_configs(str(path))
    assert from_path == from_str_path == load_callback_configs(SEED_YAML)
    dumped = [c.model_dump() for c in from_path]
    assert dumped[0]["eval_callbacks"][0]["dataset_key"] == "val"  # children dump as their own class
    assert load_callback_configs(yaml.safe_dump(dumped)) == from_path
    wrapped = {"callbacks": yaml.safe_load(SEED_YAML)}
    assert load_callback_configs(yaml.safe_dump(wrapped)) == from_path


def test_short_names_and_dotted_paths_resolve_to_the_same_config():
    short = CallbackConfig.model_validate({"kind": "OfflineLossCallback", "dataset_key": "val"})
    public = CallbackConfig.model_validate({"kind": "shardema.callbacks.OfflineLossCallback", "dataset_key": "val"})
    private = CallbackConfig.model_validate({"kind": "shardema.callbacks._offline_loss.OfflineLossCallback",
                                             "dataset_key": "val"})
    assert short == public == private
    assert short.kind == "OfflineLossCallback"
    # A concrete config fills in its kind.
    assert EmaCallbackConfig().kind == "EmaCallback"
    assert EmaCallbackConfig(kind="shardema.callbacks.EmaCallback").kind == "EmaCallback"
    assert set(cbs.registered_callbacks()) >= {"EmaCallback", "OfflineLossCallback"}


class _ProbeConfig(PeriodicCallbackConfig):
    threshold: float = 0.5


@register_callback
class ConfigProbeCallback(PeriodicCallback):
    config_class = _ProbeConfig


def test_user_callbacks_register_and_nest_under_the_ema_callback():
    config = EmaCallbackConfig.model_validate({
        "every_n_updates": 5,
        "eval_callbacks": [{"kind": f"{__name__}.ConfigProbeCallback", "every_n_updates": 2, "threshold": 0.25}],
    })
    (child,) = config.eval_callbacks
    assert isinstance(child, _ProbeConfig) and child.threshold == 0.25 and child.kind == "ConfigProbeCallback"
    # Registering the same class again is fine, a different class under a taken name is not.
    register_callback(ConfigProbeCallback)
    with pytest.raises(ValueError, match="already registered"):
        @register_callback(name="ConfigProbeCallback")
        class Other(PeriodicCallback):
            config_class = _ProbeConfig
    with pytest.raises(TypeError, match="config_class"):
        @register_callback
        class NoConfig(PeriodicCallback):
            config_class = dict


def test_an_unregistered_dotted_path_is_refused_without_instantiating_anything():
    with pytest.raises(ValidationError) as info:
        CallbackConfig.model_validate({"kind": "collections.OrderedDict"})
    assert info.value.errors()[0]["loc"] == ("kind",)
    assert "not name a registered callback" in str(info.value)


# (config, location the error must carry). Each config is malformed in exactly one field.
_VALID_EMA = {"kind": "EmaCallback", "every_n_epochs": 1}
_MALFORMED = [
    ({"kind": "NoSuchCallback"}, ("kind",)),
    ({"every_n_epochs": 1}, ("kind",)),
    ({"kind": "no_such_module_xyz.EmaCallback"}, ("kind",)),
    ({**_VALID_EMA, "every_n_epoch": 3}, ("every_n_epoch",)),
    ({**_VALID_EMA, "every_n_epochs": 0}, ("every_n_epochs",)),
    ({**_VALID_EMA, "every_n_updates": -2}, ("every_n_updates",)),
    ({**_VALID_EMA, "every_n_samples": "ten"}, ("every_n_samples",)),
    ({**_VALID_EMA, "batch_size": 32}, ("batch_size",)),
    ({**_VALID_EMA, "target_factors": []}, ("target_factors",)),
    ({**_VALID_EMA, "target_factors": [1.5]}, ("target_factors",)),
    ({**_VALID_EMA, "target_factors": [0.99, 0.99]}, ("target_factors",)),
    ({**_VALID_EMA, "target_factors": ["fast"]}, ("target_factors",)),
    ({**_VALID_EMA, "save_weights": "maybe"}, ("save_weights",)),
    ({**_VALID_EMA, "save_last_weights": 1}, ("save_last_weights",)),
    ({**_VALID_EMA, "buffers": "sum"}, ("buffers",)),
    ({**_VALID_EMA, "schedule": "cosine"}, ("schedule", "kind")),
    ({**_VALID_EMA, "shadow_dtype": "int8"}, ("shadow_dtype",)),
    ({**_VALID_EMA, "update_every": 0}, ("schedule", "update_every")),
    ({**_VALID_EMA, "start_step": -1}, ("schedule", "start_step")),
    ({**_VALID_EMA, "inv_gamma": 0.0}, ("schedule", "inv_gamma")),
    ({**_VALID_EMA, "model_paths": ["encoder", "encoder.block"]}, ("model_paths",)),
    ({**_VALID_EMA, "model_paths": ["a..b"]}, ("model_paths",)),
    ({**_VALID_EMA, "name": "  "}, ("name",)),
    ({"kind": "EmaCallback", "save_latest_weights": True}, ("every_n_epochs",)),
    ({**_VALID_EMA, "eval_callbacks": [{"kind": "OfflineLossCallback", "every_n_epochs": 1}]},
     ("eval_callbacks", 0, "dataset_key")),
    ({**_VALID_EMA, "eval_callbacks": [{"kind": "OfflineLossCallback", "dataset_key": "val", "every_n_epochs": 0}]},
     ("eval_callbacks", 0, "every_n_epochs")),
    ({**_VALID_EMA, "eval_callbacks": [{"kind": "OfflineLossCallback", "dataset_key": "val", "typo": 1}]},
     ("eval_callbacks", 0, "typo")),
    ({**_VALID_EMA, "eval_callbacks": [{"dataset_key": "val"}]}, ("eval_callbacks", 0, "kind")),
    ({**_VALID_EMA, "eval_callbacks": [{"kind": "EmaCallback", "every_n_epochs": 1}]},
     ("eval_callbacks", 0, "kind")),
    ({"kind": "OfflineLossCallback", "dataset_key": ""}, ("dataset_key",)),
]


@pytest.mark.parametrize("data, loc", _MALFORMED, ids=[".".join(map(str, loc)) + f"-{i}"
                                                       for i, (_, loc) in enumerate(_MALFORMED)])
def test_malformed_configs_are_rejected_naming_the_field(data, loc):
    assert len(_MALFORMED) >= 15
    with pytest.raises(ValidationError) as info:
        load_callback_configs([data])
    locs = [tuple(e["loc"]) for e in info.value.errors()]
    assert (0, *loc) in locs, locs
    field = next(part for part in reversed(loc) if isinstance(part, str))
    assert field in str(info.value)


def test_a_concrete_config_refuses_another_callbacks_kind():
    with pytest.raises(ValidationError) as info:
        EmaCallbackConfig(kind="OfflineLossCallback")
    assert info.value.errors()[0]["loc"] == ("kind",)
    assert "OfflineLossCallbackConfig" in str(info.value)


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="list of callback configs"):
        load_callback_configs("kind: EmaCallback\nevery_n_epochs: 1\n")
    with pytest.raises(FileNotFoundError):
        load_callback_configs(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_callback_configs("- kind: [unclosed\n- x")
    assert load_callback_configs("# nothing\n") == []


def test_engine_options_reach_the_config():
    config = EmaCallbackConfig(every_n_updates=10, schedule="power", power=0.75, update_every=2, start_step=5,
                               shadow_dtype="live", buffers="average", model_paths=["encoder", "decoder"],
                               target_factors=[0.999, 0.9999])
    assert config.torch_shadow_dtype is None and config.model_paths == ("encoder", "decoder")
    import torch
    assert EmaCallbackConfig().torch_shadow_dtype is torch.float32


def test_a_dotted_kind_never_imports_a_module_that_was_not_allowed(tmp_path, monkeypatch):
    import sys

    from shardema.callbacks import allow_callback_imports

    package = tmp_path / "third_party_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "side_effect.py").write_text("import pathlib\npathlib.Path(__file__).with_name('IMPORTED').touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValidationError, match="allow_callback_imports\\('third_party_pkg'\\)"):
        CallbackConfig.model_validate({"kind": "third_party_pkg.side_effect.Thing"})
    assert not (package / "IMPORTED").exists() and "third_party_pkg.side_effect" not in sys.modules
    allow_callback_imports("third_party_pkg")
    with pytest.raises(ValidationError, match="does not name a registered callback"):
        CallbackConfig.model_validate({"kind": "third_party_pkg.side_effect.Thing"})
    assert (package / "IMPORTED").exists()  # allowed: imported, and still refused (not a callback)
    with pytest.raises(ValueError, match="not a package name"):
        allow_callback_imports("../x")


def test_after_epoch_before_any_update_says_so():
    from shardema.callbacks import CallbackRunner, MemoryWriter

    runner = CallbackRunner([], writer=MemoryWriter(), updates_per_epoch=4)
    runner.before_training()
    with pytest.raises(ValueError, match="before any after_update"):
        runner.after_epoch()


def test_a_missing_config_path_without_suffix_is_not_parsed_as_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/ema_callbacks"):
        load_callback_configs("configs/ema_callbacks")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_callback_configs(str(tmp_path / "nothing_here"))
    path = tmp_path / "callbacks"  # an existing file without a suffix is read
    path.write_text("- kind: EmaCallback\n  save_last_weights: false\n")
    assert load_callback_configs(str(path))[0].kind == "EmaCallback"
    assert load_callback_configs("[]") == [] and load_callback_configs("# nothing") == []
