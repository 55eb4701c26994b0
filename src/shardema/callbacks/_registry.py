"""The explicit registry that maps a config's ``kind`` to a callback class.

It imports nothing of the callback layer: classes register themselves when they are
defined (``class MyEval(PeriodicCallback, kind="MyEval")``, see ``_base``), and the
built-in kinds are imported on first use.

[Note: kinds]
A ``kind`` is either the short name a callback was registered under
(``EmaCallback``) or a dotted import path to a registered callback class
(``shardema.callbacks.EmaCallback``, ``my_project.callbacks.MyEval``). A dotted
path must name a registered class: configs never instantiate arbitrary objects.
Nor do they import arbitrary modules: a dotted path's module is imported only when
it is shardema's own or its package was allowed with
:func:`allow_callback_imports` (``allow_callback_imports("my_project")``);
otherwise it must already be imported. Every kind is stored in its short form, so
dumped configs are canonical.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

_REGISTRY: dict[str, type] = {}

_BUILTINS: dict[str, str] = {
    "EmaCallback": "shardema.callbacks._ema_callback",
    "OfflineLossCallback": "shardema.callbacks._offline_loss",
}
"""Built-in kinds and the module that defines each: imported on first use, so validating a
config never depends on which modules happened to be imported before."""


_IMPORTABLE: set[str] = {"shardema"}


def allow_callback_imports(*packages: str) -> None:
    """Let configs import the modules of these packages to find dotted ``kind`` paths.

    ``allow_callback_imports("my_project")`` makes ``kind: my_project.callbacks.MyEval``
    import ``my_project.callbacks`` when needed. Without it, a config can name only
    classes whose module is already imported.
    """
    for package in packages:
        if not isinstance(package, str) or not all(part.isidentifier() for part in package.split(".")):
            raise ValueError(f"{package!r} is not a package name such as 'my_project'")
        _IMPORTABLE.add(package)


def _import_allowed(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in _IMPORTABLE)


def add(key: str, klass: type) -> None:
    """Store ``klass`` under ``key`` (checked by the caller: ``CallbackBase`` subclass with a config class).

    Registering the same class again (a module imported twice) is allowed; giving a
    name to a different class raises.
    """
    if not key.isidentifier():
        raise ValueError(f"callback name {key!r} must be an identifier such as 'MyEvalCallback'")
    existing = _REGISTRY.get(key)
    if existing is not None and _qualified(existing) != _qualified(klass):
        raise ValueError(
            f"callback name {key!r} is already registered for {_qualified(existing)}; "
            f"register {_qualified(klass)} under another name: class {klass.__name__}(..., kind='...')"
        )
    _REGISTRY[key] = klass


def _qualified(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def _load_builtins() -> None:
    for module in _BUILTINS.values():
        importlib.import_module(module)


def registered_callbacks() -> dict[str, type]:
    """A copy of the registry: short name -> callback class (built-ins included)."""
    _load_builtins()
    return dict(_REGISTRY)


def known_kinds() -> str:
    """The registered short names, comma separated (for error messages)."""
    return ", ".join(sorted(registered_callbacks())) or "(none)"


def resolve_kind(kind: object) -> tuple[str, type]:
    """Short name and callback class of ``kind`` (short name or dotted path); see [Note: kinds]."""
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError(f"kind must be a callback name such as 'EmaCallback', got {kind!r}; known: {known_kinds()}")
    kind = kind.strip()
    if kind not in _REGISTRY and kind in _BUILTINS:
        importlib.import_module(_BUILTINS[kind])
    if kind in _REGISTRY:
        return kind, _REGISTRY[kind]
    if "." not in kind:
        raise ValueError(f"unknown callback kind {kind!r}; known kinds: {known_kinds()} "
                         "(or a dotted import path to a registered callback class)")
    module_name, _, attr = kind.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        if not _import_allowed(module_name):
            top = module_name.split(".")[0]
            raise ValueError(f"kind {kind!r}: module {module_name!r} is not imported, and configs import only "
                             f"allowed packages; import it before loading the config, or call "
                             f"shardema.callbacks.allow_callback_imports({top!r}); known kinds: {known_kinds()}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"kind {kind!r}: cannot import module {module_name!r} ({exc}); "
                             f"known kinds: {known_kinds()}") from None
    target = getattr(module, attr, None)
    for short, klass in registered_callbacks().items():
        if klass is target:
            return short, klass
    raise ValueError(f"kind {kind!r} does not name a registered callback class; define it with "
                     f"`class {attr}(CallbackBase, kind='{attr}')`, or use one of: {known_kinds()}")


def kinds_of_config(config_class: type) -> list[str]:
    """Short names of the callbacks configured by exactly ``config_class``."""
    return [short for short, klass in registered_callbacks().items() if _config_class(klass) is config_class]


def _config_class(klass: type) -> Any:
    return getattr(klass, "config_class", None)
