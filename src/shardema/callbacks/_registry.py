"""The explicit registry that maps a config's ``kind`` to a callback class.

[Note: kinds]
A ``kind`` is either the short name a callback was registered under
(``EmaCallback``) or a dotted import path to a registered callback class
(``shardema.callbacks.EmaCallback``, ``my_project.callbacks.MyEval``). A dotted
path imports its module, which registers the classes it defines, and then must
name a registered class: configs never instantiate arbitrary objects. Every kind
is stored in its short form, so dumped configs are canonical.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from ._base import CallbackBase, CallbackContext
    from ._config import CallbackConfig

_REGISTRY: dict[str, type] = {}

C = TypeVar("C", bound=type)


def register_callback(cls: C | None = None, *, name: str | None = None) -> C | Callable[[C], C]:
    """Class decorator: make a callback class available as ``kind: <name>`` in configs.

    ``name`` defaults to the class name. The class must define ``config_class``, a
    subclass of :class:`CallbackConfig`. Registering the same class again (a module
    imported twice) is allowed; giving a name to a different class raises.
    """

    def decorate(klass: C) -> C:
        from ._base import CallbackBase
        from ._config import CallbackConfig

        if not (isinstance(klass, type) and issubclass(klass, CallbackBase)):
            raise TypeError(f"register_callback expects a CallbackBase subclass, got {klass!r}")
        config_class = getattr(klass, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, CallbackConfig)):
            raise TypeError(f"{klass.__name__}.config_class must be a CallbackConfig subclass, got {config_class!r}")
        key = name or klass.__name__
        if not key.isidentifier():
            raise ValueError(f"callback name {key!r} must be an identifier such as 'MyEvalCallback'")
        existing = _REGISTRY.get(key)
        if existing is not None and _qualified(existing) != _qualified(klass):
            raise ValueError(
                f"callback name {key!r} is already registered for {_qualified(existing)}; "
                f"register {_qualified(klass)} under another name: @register_callback(name='...')"
            )
        _REGISTRY[key] = klass
        klass.kind_name = key
        return klass

    return decorate if cls is None else decorate(cls)


def _qualified(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def registered_callbacks() -> dict[str, type]:
    """A copy of the registry: short name -> callback class."""
    return dict(_REGISTRY)


def known_kinds() -> str:
    """The registered short names, comma separated (for error messages)."""
    return ", ".join(sorted(_REGISTRY)) or "(none)"


def resolve_kind(kind: object) -> tuple[str, type]:
    """Short name and callback class of ``kind`` (short name or dotted path); see [Note: kinds]."""
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError(f"kind must be a callback name such as 'EmaCallback', got {kind!r}; known: {known_kinds()}")
    kind = kind.strip()
    if kind in _REGISTRY:
        return kind, _REGISTRY[kind]
    if "." not in kind:
        raise ValueError(f"unknown callback kind {kind!r}; known kinds: {known_kinds()} "
                         "(or a dotted import path to a registered callback class)")
    module_name, _, attr = kind.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"kind {kind!r}: cannot import module {module_name!r} ({exc}); "
                         f"known kinds: {known_kinds()}") from None
    target = getattr(module, attr, None)
    for short, klass in _REGISTRY.items():
        if klass is target:
            return short, klass
    raise ValueError(f"kind {kind!r} does not name a registered callback class; decorate it with "
                     f"@register_callback, or use one of: {known_kinds()}")


def kinds_of_config(config_class: type) -> list[str]:
    """Short names of the callbacks configured by exactly ``config_class``."""
    return [short for short, klass in _REGISTRY.items() if klass.config_class is config_class]


def build_callback(config: CallbackConfig, context: CallbackContext) -> CallbackBase:
    """Instantiate the callback a validated config names."""
    _, klass = resolve_kind(config.kind)
    return klass(config, context)
