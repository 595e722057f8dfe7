"""``Intervention``: the base class of tracevene's intervention modules and of yours.

An intervention is a plain ``nn.Module`` called as ``intervention(base, source=None)``
that returns the new value of a site. Subclasses of ``iv.Intervention`` get three
things for free: their constructor arguments are remembered as a JSON spec, the class
registers itself by name (so programs that call it can be saved and loaded without
pickle), and ``repr`` shows the configuration.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ProgramFormatError, RegistryError, ShapeError
from .registry import register

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Intervention(nn.Module):
    """Base class for intervention modules: ``forward(base, source=None) -> tensor``.

    Subclass it, call ``super().__init__()`` first in your constructor, and store every
    tensor argument as a parameter or buffer. The class is registered under its name
    (pass ``name=...`` in the class statement to choose another) so that a program that
    calls it can be saved and loaded. Constructor arguments must be JSON values
    (numbers, strings, booleans, None, lists, dicts), ``torch.dtype`` or tensors; a
    tensor argument is stored in the spec by shape and dtype only, and its values come
    back from the saved parameters and buffers.

    Attributes:
        temperature_schedule: ``(start, end)`` for interventions that have a
            ``temperature`` buffer; ``iv.train`` anneals it from ``start`` to
            ``end`` over training (``None`` for interventions without one).

    Example:
        ```python
        import torch
        import tracevene as iv

        class Clamp(iv.Intervention):
            def __init__(self, low: float, high: float):
                super().__init__()
                self.low, self.high = low, high

            def forward(self, base, source=None):
                return base.clamp(self.low, self.high)

        clamp = Clamp(-1.0, 1.0)
        print(clamp, clamp.spec())
        ```
    """

    temperature_schedule: tuple[float, float] | None = None
    _spec_args: dict[str, Any]

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__dict__["__init__"])  # type: ignore[method-assign]
        if name is not None or not cls.__name__.startswith("_"):  # _Private: shared bases
            register(name or cls.__name__)(cls)

    def spec(self) -> dict:
        """The constructor arguments, as JSON (tensors by shape and dtype)."""
        args = getattr(self, "_spec_args", {})
        return {k: _encode(type(self).__name__, k, v) for k, v in args.items()}

    @classmethod
    def from_spec(cls, spec: dict) -> Intervention:
        """A new instance from ``spec`` (tensor arguments zero until loaded)."""
        return cls(**{k: _decode(v) for k, v in spec.items()})

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr`` shows them."""
        return ", ".join(f"{k}={_short(v)}" for k, v in getattr(self, "_spec_args", {}).items())


def _recording(init: Any) -> Any:
    """Wrap ``__init__`` so the outermost call records its bound arguments."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        values.pop(next(iter(signature.parameters)))  # self
        for p in signature.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                values.update(values.pop(p.name))
            elif p.kind is p.VAR_POSITIONAL:
                raise RegistryError(f"{type(self).__name__}: *{p.name} arguments cannot be saved")
        object.__setattr__(self, "_spec_args", values)  # the last (outermost) init wins

    return wrapper


def _encode(cls: str, key: str, v: Any) -> Any:
    if isinstance(v, Tensor):
        return {"tensor": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, (list, tuple)):
        return [_encode(cls, key, x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _encode(cls, key, x) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise RegistryError(
        f"{cls}: constructor argument {key}={v!r} ({type(v).__name__}) cannot be saved; "
        "use numbers, strings, booleans, None, lists, dicts, torch dtypes or tensors."
    )


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        if set(v) == {"tensor", "dtype"}:
            return torch.zeros(v["tensor"], dtype=_dtype(v["dtype"]))
        if set(v) == {"dtype"}:
            return _dtype(v["dtype"])
        if set(v) == {"dict"} and isinstance(v["dict"], dict):
            return {k: _decode(x) for k, x in v["dict"].items()}
        raise ProgramFormatError(
            f"cannot decode the saved constructor argument {v!r}: an encoded value is a "
            "list, {'tensor': shape, 'dtype': name}, {'dtype': name} or {'dict': {...}}. "
            "The file is damaged or was written by another tracevene version: save the "
            "program again with this one."
        )
    return v


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ProgramFormatError(
            f"unknown dtype {name!r} in a saved constructor argument: use a torch dtype "
            "name such as 'float32' or 'bfloat16'. The file is damaged or was written "
            "with another torch version: save the program again with this one."
        )
    return dtype


def _short(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"tensor{list(v.shape)}"
    return repr(v)


def check_width(module: nn.Module, x: Tensor, d: int, what: str = "base") -> None:
    """Raise ``iv.ShapeError`` unless the last dimension of ``x`` is ``d``."""
    if x.dim() == 0 or x.shape[-1] != d:
        raise ShapeError(
            f"{type(module).__name__}(d={d}) was given a {what} of shape {tuple(x.shape)}; its "
            f"last dimension must be {d}. Apply it to a site whose last dimension is {d} "
            "(for heads, index one head), or build it with the site's width."
        )


def need_source(module: nn.Module, source: Tensor | None) -> Tensor:
    """``source``, or a clear error when an interchange-type intervention lacks one."""
    if source is None:
        raise ArgumentError(
            f"{type(module).__name__} swaps values in from a source: call it as "
            f"{type(module).__name__}(...)(base, source), e.g. "
            "t.layer[1].resid_post = rot(t.layer[1].resid_post, src.layer[1].resid_post)."
        )
    return source


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision activations (numerics of the mix), else ``x.dtype``."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def lookup_variable(module: nn.Module, variables: Mapping[str, Any], variable: str) -> Any:
    """``variables[variable]``, or an error that lists the module's variables."""
    if variable not in variables:
        raise ArgumentError(
            f"{type(module).__name__} has no variable {variable!r}; its variables: "
            f"{', '.join(variables) or 'none (build it with variables={...})'}"
        )
    return variables[variable]
