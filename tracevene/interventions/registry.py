"""The registry of intervention modules that programs can save and load by name.

Loading a program never imports a path found in a file: module types are looked up
here, and a user's own class registers itself with ``iv.register``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..errors import ProgramFormatError, RegistryError

M = TypeVar("M", bound=type[nn.Module])

# name -> (class, spec_of(module) -> dict, build(spec) -> module)
_REGISTRY: dict[str, tuple[type, Callable[[Any], dict], Callable[[dict], nn.Module]]] = {}


def register(name: str | None = None) -> Callable[[M], M]:
    """Class decorator: make an ``nn.Module`` subclass saveable in programs.

    The class must define ``spec(self) -> dict`` (JSON-ready constructor arguments)
    and ``from_spec(cls, spec) -> module`` (a classmethod). Parameters and buffers
    are saved separately as safetensors.

    Args:
        name: Registered name (defaults to the class name).

    Example:
        ```python
        import torch
        import tracevene as iv

        @iv.register()
        class Shift(torch.nn.Module):
            def __init__(self, d: int):
                super().__init__()
                self.d = d
                self.b = torch.nn.Parameter(torch.zeros(d))

            def spec(self) -> dict:
                return {"d": self.d}

            @classmethod
            def from_spec(cls, spec: dict) -> "Shift":
                return cls(**spec)

            def forward(self, x):
                return x + self.b
        ```
    """

    def deco(cls: M) -> M:
        for attr in ("spec", "from_spec"):
            if not callable(getattr(cls, attr, None)):
                raise RegistryError(
                    f"{cls.__name__} cannot be registered: it needs a {attr}() method "
                    "(spec() returns the constructor arguments as a JSON-ready dict; "
                    "from_spec(spec) is a classmethod that rebuilds the module)."
                )
        key = name or cls.__name__
        _check_free(key, cls)
        checked: Any = cls  # has spec and from_spec (checked above)
        _REGISTRY[key] = (cls, lambda m: m.spec(), checked.from_spec)
        checked._tracevene_name = key
        return cls

    return deco


def _check_free(key: str, cls: type) -> None:
    """Refuse to shadow another class's name (redefining the same class is fine)."""
    old = _REGISTRY.get(key, (None,))[0]
    same = old is not None and (old.__module__, old.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if old is not None and not same:
        raise RegistryError(
            f"the intervention name {key!r} is already taken by "
            f"{old.__module__}.{old.__qualname__}; give {cls.__qualname__} another name: "
            f"class {cls.__name__}(iv.Intervention, name='...') or @iv.register('...')."
        )


def register_external(
    cls: type, name: str, spec: Callable[[Any], dict], build: Callable[[dict], nn.Module]
) -> None:
    """Register a class you cannot decorate (e.g. ``torch.nn.Linear``)."""
    _REGISTRY[name] = (cls, spec, build)


def describe(module: nn.Module) -> tuple[str, dict]:
    """``(registered name, spec)`` of a module.

    Raises:
        RegistryError: The module's class is not registered.
    """
    for key, (cls, spec, _) in _REGISTRY.items():
        if type(module) is cls:
            return key, spec(module)
    raise RegistryError(
        f"cannot save a program that calls a {type(module).__name__}: its class is not "
        "registered. Decorate the class with @tracevene.register() and give it "
        "spec() and from_spec(); see the docstring of tracevene.register."
    )


def lookup(name: Any) -> type | None:
    """The class registered under ``name``, or ``None``."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    return None if entry is None else entry[0]


def build(name: object, spec: dict) -> nn.Module:
    """A new module of registered type ``name`` from its spec.

    Raises:
        ProgramFormatError: No class is registered under ``name``, or the spec is bad.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ProgramFormatError(
            f"unknown intervention type {name!r}; registered types: "
            f"{', '.join(sorted(_REGISTRY))}. If it is your own class, import the module "
            "that registers it (it defines an iv.Intervention subclass, or uses "
            "@tracevene.register) before loading."
        )
    if not isinstance(spec, dict):
        raise ProgramFormatError(f"bad spec {spec!r} for {name}: expected an object")
    try:
        return _REGISTRY[name][2](spec)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ProgramFormatError(f"bad spec {spec!r} for {name}: {e}") from None


register_external(
    nn.Linear,
    "torch.nn.Linear",
    lambda m: {"in_features": m.in_features, "out_features": m.out_features,
               "bias": m.bias is not None},
    lambda s: nn.Linear(s["in_features"], s["out_features"], bias=s["bias"]),
)  # fmt: skip
register_external(nn.Identity, "torch.nn.Identity", lambda m: {}, lambda s: nn.Identity())
