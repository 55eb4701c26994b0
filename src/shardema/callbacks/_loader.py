"""load_callback_configs: validated callback configs from a YAML file or YAML text.

PyYAML is the optional extra ``shardema[callbacks]``: it is imported when YAML is
parsed, so ``import shardema.callbacks`` and a parsed list work without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, SerializeAsAny, TypeAdapter

from ._config import CallbackConfig

_CONFIG_LIST = TypeAdapter(list[SerializeAsAny[CallbackConfig]], config=ConfigDict(title="callback configs"))


def _yaml():
    """The ``yaml`` module (PyYAML); an ImportError naming the extra when it is not installed."""
    try:
        import yaml
    except ImportError as exc:
        raise ImportError('reading callback configs from YAML needs PyYAML, which shardema installs as an '
                          'extra: pip install "shardema[callbacks]" (or pass the configs as a parsed list)') from exc
    return yaml


def _read(source: str | os.PathLike) -> tuple[str, str]:
    """(text, where) of a path or of YAML text."""
    if isinstance(source, os.PathLike):
        return Path(source).read_text(encoding="utf-8"), str(source)
    if not isinstance(source, str):
        raise TypeError(f"load_callback_configs takes a path or YAML text, got {type(source).__name__}")
    line = source.strip()
    # One line that is not YAML's list, mapping, flow or comment syntax names a file, with or
    # without a .yaml suffix: "configs/ema" that does not exist is an error, never YAML text.
    looks_like_path = "\n" not in line and (line.endswith((".yaml", ".yml")) or not (
        line.startswith(("-", "[", "{", "#")) or ":" in line))
    if looks_like_path or ("\n" not in source and os.path.isfile(source)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"callback config file {source!r} does not exist")
        return path.read_text(encoding="utf-8"), source
    return source, "<yaml text>"


def load_callback_configs(source: str | os.PathLike | list) -> list[CallbackConfig]:
    """The validated list of callback configs in a YAML file, YAML text or a parsed list.

    The document is a list of mappings, each with a ``kind``, or a mapping whose
    ``callbacks`` key holds that list. Each entry is validated with the config class
    of its ``kind`` (nested ``eval_callbacks`` too); errors are raised as one
    ``pydantic.ValidationError`` whose locations name the fields (``0.every_n_epochs``).
    """
    if isinstance(source, list):
        data: Any = source
    else:
        text, where = _read(source)
        yaml = _yaml()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{where} is not valid YAML: {exc}") from None
        if isinstance(data, dict) and "callbacks" in data:
            data = data["callbacks"]
        if data is None:
            data = []
        if not isinstance(data, list):
            raise ValueError(f"{where} must hold a list of callback configs (or a mapping with a 'callbacks' "
                             f"list), got a {type(data).__name__}")
    return _CONFIG_LIST.validate_python(data)
