"""The registry of FusedMoE methods, keyed by scheme name: the single source of truth for the CLI's
choices, the README's table and the tests' parametrisation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from moequant.methods.base import FusedMoEMethodBase

_METHODS: dict[str, type["FusedMoEMethodBase"]] = {}
M = TypeVar("M", bound=type)


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a FusedMoEMethodBase subclass under `name`."""

    def wrap(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    import moequant.methods  # noqa: F401  (registers the built-in methods)


def get_method(name: str) -> type["FusedMoEMethodBase"]:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown MoE quantization scheme {name!r}; registered: {', '.join(list_methods())}") from None


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)
