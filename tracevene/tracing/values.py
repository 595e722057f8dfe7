"""Traced values: stand-ins that record what the with-block does with them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import NotRunError, ProgramFormatError, TraceError
from ..ir.nodes import check_method, function_name, resolve_function

if TYPE_CHECKING:
    from .tracer import Tracer

#: The type of an operator method of ``Value`` (set on the class by the loops below it).
_Binary = Callable[["Value", Any], "Value"]
_Unary = Callable[["Value"], "Value"]

_CONTROL_FLOW = (
    "a traced value has no value while the with-block records the program, so Python "
    "cannot {what} it. For a data-dependent choice use torch.where(cond, a, b); to look "
    "at the number, .save() it and read saved.value after the block; to loop over "
    "positions or heads, loop over plain ints (for p in range(n): site[:, p])."
)

_BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
           "and", "or", "xor", "lshift", "rshift")  # fmt: skip
_COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
_UNARY = ("neg", "pos", "abs", "invert")
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%",
            "pow": "**", "matmul": "@", "and": "&", "or": "|", "xor": "^", "lshift": "<<",
            "rshift": ">>"}  # fmt: skip


class Value:
    """A value of the program being recorded: a site's tensor or one computed from it.

    Supports operators, indexing, tensor methods, torch functions and ``nn.Module``
    calls; each use records one node.
    """

    __slots__ = ("_tracer", "_node")
    if TYPE_CHECKING:  # the operators the loops below set, for type checkers
        __add__: ClassVar[_Binary]
        __radd__: ClassVar[_Binary]
        __iadd__: ClassVar[_Binary]
        __sub__: ClassVar[_Binary]
        __rsub__: ClassVar[_Binary]
        __isub__: ClassVar[_Binary]
        __mul__: ClassVar[_Binary]
        __rmul__: ClassVar[_Binary]
        __imul__: ClassVar[_Binary]
        __truediv__: ClassVar[_Binary]
        __rtruediv__: ClassVar[_Binary]
        __itruediv__: ClassVar[_Binary]
        __floordiv__: ClassVar[_Binary]
        __rfloordiv__: ClassVar[_Binary]
        __ifloordiv__: ClassVar[_Binary]
        __mod__: ClassVar[_Binary]
        __rmod__: ClassVar[_Binary]
        __imod__: ClassVar[_Binary]
        __pow__: ClassVar[_Binary]
        __rpow__: ClassVar[_Binary]
        __ipow__: ClassVar[_Binary]
        __matmul__: ClassVar[_Binary]
        __rmatmul__: ClassVar[_Binary]
        __imatmul__: ClassVar[_Binary]
        __and__: ClassVar[_Binary]
        __rand__: ClassVar[_Binary]
        __iand__: ClassVar[_Binary]
        __or__: ClassVar[_Binary]
        __ror__: ClassVar[_Binary]
        __ior__: ClassVar[_Binary]
        __xor__: ClassVar[_Binary]
        __rxor__: ClassVar[_Binary]
        __ixor__: ClassVar[_Binary]
        __lshift__: ClassVar[_Binary]
        __rlshift__: ClassVar[_Binary]
        __ilshift__: ClassVar[_Binary]
        __rshift__: ClassVar[_Binary]
        __rrshift__: ClassVar[_Binary]
        __irshift__: ClassVar[_Binary]
        __lt__: ClassVar[_Binary]
        __le__: ClassVar[_Binary]
        __gt__: ClassVar[_Binary]
        __ge__: ClassVar[_Binary]
        # == and != record a node (a traced value), as torch.Tensor's return a tensor
        __eq__: ClassVar[_Binary]  # pyright: ignore[reportIncompatibleMethodOverride]
        __ne__: ClassVar[_Binary]  # pyright: ignore[reportIncompatibleMethodOverride]
        __neg__: ClassVar[_Unary]
        __pos__: ClassVar[_Unary]
        __abs__: ClassVar[_Unary]
        __invert__: ClassVar[_Unary]

    def __init__(self, tracer: Tracer, node: int):
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_node", node)

    # -- recording helpers ---------------------------------------------------
    def _call(self, fn: str, *args: Any) -> Value:
        return self._tracer.value("call_function", fn, args)

    def _inplace(self, op: str, other: Any) -> Value:
        """``self op= other`` on a computed value: a new value that the name rebinds to."""
        new = self._call(_function(op), self, other)
        self._tracer.rebinds[new._node] = f"{_SYMBOLS[op]}="
        return new

    def save(self, name: str | None = None) -> Saved:
        """Keep this value for after the run.

        Args:
            name: Name under which ``result[name]`` finds it (optional).

        Returns:
            A handle whose ``.value`` is the tensor once the program has run.
        """
        return self._tracer.save(self, name)

    def __getitem__(self, index: Any) -> Value:
        _check_index(self, index)
        return self._tracer.value("getitem", None, (self, index))

    def __setitem__(self, index: Any, value: Any) -> None:
        _check_index(self, index)
        node = self._tracer.add("setitem", None, None, (self, index, value))
        object.__setattr__(self, "_node", node)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_tracer", "_node"):
            # the attribute protocol (hasattr, copy, pickle): stays a plain AttributeError
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}", name=name
            )
        if name == "shape":
            return self._tracer.value("call_method", "size", (self,))
        if name == "ndim":
            return self._tracer.value("call_method", "dim", (self,))
        if name == "T":
            return self._tracer.value("call_method", "t", (self,))
        if name == "value":
            raise TraceError(
                f"{self!r} was not saved, so it has no .value: save it inside the with-block "
                "(saved = x.save(), or x.save('name')) and read saved.value, or "
                "result['name'], after the block."
            )
        if name in ("dtype", "device", "grad", "data", "requires_grad"):
            raise TraceError(
                f"{name!r} of a traced value is not known while recording; compute with "
                "the value itself, or read it from saved.value after the block."
            )
        check_method(name)

        def method(*args: Any, **kwargs: Any) -> Value:
            return self._tracer.value("call_method", name, (self, *args), kwargs)

        return method

    def __setattr__(self, name: str, value: Any) -> None:
        raise TraceError(f"cannot set attribute {name!r} on a traced value.")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        tracer = _find_tracer((args, kwargs))
        assert tracer is not None, "torch calls this with a Value among the arguments"
        name = function_name(func)
        if name is not None:
            _reject_inplace(name, kwargs or {})
            kwargs = {k: v for k, v in (kwargs or {}).items() if not k.startswith("_")}
            return tracer.value("call_function", name, args, kwargs)
        method = getattr(func, "__name__", "")
        if getattr(torch.Tensor, method, None) is not None:
            return tracer.value("call_method", check_method(method), args, kwargs or {})
        raise TraceError(f"{func!r} cannot be recorded: it is not a torch.* function.")

    # -- Python control flow is not recordable ---------------------------------
    def __bool__(self) -> bool:
        raise TraceError(_CONTROL_FLOW.format(what="branch on (if / while / and / or)"))

    def __len__(self) -> int:
        raise TraceError(_CONTROL_FLOW.format(what="take len() of") + " Use x.size(dim).")

    def __iter__(self):
        raise TraceError(_CONTROL_FLOW.format(what="iterate over"))

    def __index__(self) -> int:
        what = "take int(), float(), range() or a list index of"
        raise TraceError(_CONTROL_FLOW.format(what=what))

    __int__ = __float__ = __index__

    def __contains__(self, item: Any) -> bool:
        raise TraceError(_CONTROL_FLOW.format(what="test membership in"))

    __hash__ = object.__hash__

    def __format__(self, spec: str) -> str:
        if not spec:
            return str(self)  # f"{x}" and print(x) show the repr
        raise TraceError(
            f"cannot format {self!r} with {spec!r}: a traced value has no number while the "
            "with-block records the program. Save it (saved = x.save()) and format "
            "saved.value after the block, e.g. f'{saved.value.item():" + spec + "}'."
        )

    # -- neither pickle nor NumPy can see inside a traced value ---------------------
    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TraceError(
            f"{self!r} cannot be pickled (torch.save, pickle, copy): it stands for a tensor "
            "that exists only when the program runs, and pickling it would pickle its "
            "tracer and the whole model. Save it inside the block (saved = x.save()) and "
            "call torch.save(saved.value, path) after the block."
        )

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def __getstate__(self) -> Any:
        return self.__reduce_ex__(2)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceError(_numpy("np.asarray / np.array"))

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        raise TraceError(_numpy(f"np.{getattr(ufunc, '__name__', ufunc)}"))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        raise TraceError(_numpy(f"np.{getattr(func, '__name__', func)}"))

    def __repr__(self) -> str:
        return f"<traced value %{self._node}>"


def _numpy(what: str) -> str:
    return (
        f"{what} cannot compute with a traced value: NumPy does not record into the "
        "program. Use the torch function (torch.exp(x)) or tensor method (x.exp()) "
        "inside the block; for a NumPy array, .save() it and use saved.value.numpy() "
        "after the block."
    )


def _check_index(value: Value, index: Any) -> None:
    """Refuse string indices, which torch would only reject when the program runs."""
    items = index if isinstance(index, (tuple, list)) else (index,)
    bad = next((i for i in items if isinstance(i, str)), None)
    if bad is not None:
        raise TraceError(
            f"{value!r}[{index!r}]: a string is not a tensor index. Index traced values "
            "with ints, slices, None, ..., or tensors; sites are attributes (t.logits, "
            "t.layer[0].mlp.out), not string keys."
        )


def _function(name: str) -> str:
    return f"operator.{name}" if name not in ("and", "or") else f"operator.{name}_"


def _binary(name: str, reflected: bool = False):
    fn = _function(name)

    def method(self: Value, other: Any) -> Value:
        return self._call(fn, other, self) if reflected else self._call(fn, self, other)

    return method


def _augmented(name: str):
    def method(self: Value, other: Any) -> Value:
        return self._inplace(name, other)

    return method


def _install_operators() -> None:
    """Set ``Value``'s operator methods (the class declares them for type checkers)."""
    for op in _BINARY:
        setattr(Value, f"__{op}__", _binary(op))
        setattr(Value, f"__r{op}__", _binary(op, reflected=True))
        setattr(Value, f"__i{op}__", _augmented(op))
    for op in _COMPARE:
        setattr(Value, f"__{op}__", _binary(op))
    for op in _UNARY:
        setattr(Value, f"__{op}__", lambda self, _fn=f"operator.{op}": self._call(_fn, self))


_install_operators()


class Alias(Value):
    """A site's value, or an index of one: in-place changes through it write the site.

    ``x op= v`` and ``x[i] = v`` on an alias record a write of the region it names
    (``x op v`` is computed from ``x`` as it was read); afterwards the alias, and the
    aliases it was indexed from, name the region's new value. Basic indexing of an
    alias (ints, slices, None, ``...``: a view in torch) gives an alias of the
    sub-region (views of views write through ``setitem`` copies); advanced indexing
    (lists, tensors, masks, traced values) gives a copy, a computed value.
    """

    __slots__ = ("_run", "_site", "_read")

    def _fresh(self) -> tuple[int, int]:
        """Record a new read of the region: (node of its value, node of the read)."""
        raise NotImplementedError

    def _assign(self, value: Any) -> None:
        """Record a write of the whole region."""
        raise NotImplementedError

    def _assign_at(self, index: Any, value: Any) -> None:
        """Record a write of ``region[index]``."""
        raise NotImplementedError

    def __getitem__(self, index: Any) -> Value:
        if not _is_view(index):  # advanced indexing: a copy, as in torch
            return super().__getitem__(index)
        return SiteView(self, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        _check_index(self, index)
        if not self._is_echo(index, value):
            self._assign_at(index, value)
        self._rebind()

    def _inplace(self, op: str, other: Any) -> Value:
        self._assign(self._call(_function(op), self, other))
        self._rebind()
        return self

    def _is_echo(self, index: Any, value: Any) -> bool:
        """Whether ``self[index] = value`` writes back a view that is already current.

        Python runs ``x[i] op= v`` as ``y = x[i]; y op= v; x[i] = y``: the view ``y``
        already wrote itself, so the last step would write the same values again.
        """
        return (
            isinstance(value, SiteView)
            and value._parent is self
            and value._index is index
            and self._tracer.unwritten_since(value._read)
        )

    def _rebind(self) -> None:
        """Point this alias and the aliases it was indexed from at their new values."""
        alias = self
        while isinstance(alias, Alias):
            node, read = alias._fresh()
            object.__setattr__(alias, "_node", node)
            object.__setattr__(alias, "_read", read)
            alias = alias._parent if isinstance(alias, SiteView) else None


def _is_view(index: Any) -> bool:
    """Whether torch's ``x[index]`` is a view of ``x``: ints, slices, None and ``...`` only."""
    items = index if isinstance(index, tuple) else (index,)
    basic = (int, slice, type(None), type(Ellipsis))
    return all(isinstance(i, basic) and not isinstance(i, bool) for i in items)


class SiteView(Alias):
    """``alias[index]``: a region of a site; in-place changes through it write the site."""

    __slots__ = ("_parent", "_index")

    def __init__(self, parent: Alias, index: Any):
        node = parent._tracer.add("getitem", None, None, (parent, index))
        super().__init__(parent._tracer, node)
        values = (parent._run, parent._site, parent._read, parent, index)
        for name, v in zip(("_run", "_site", "_read", "_parent", "_index"), values, strict=True):
            object.__setattr__(self, name, v)

    def _fresh(self) -> tuple[int, int]:
        tracer = self._tracer
        parent, read = self._parent._fresh()
        node = tracer.add("getitem", None, None, (Value(tracer, parent), self._index))
        tracer.rereads.add(node)
        return node, read

    def _assign(self, value: Any) -> None:
        self._parent._assign_at(self._index, value)

    def _assign_at(self, index: Any, value: Any) -> None:
        tracer = self._tracer
        current = Value(tracer, self._fresh()[0])
        copy = tracer.add("setitem", None, None, (current, index, value))
        self._assign(Value(tracer, copy))


class Saved(Value):
    """A saved value.

    Inside the block it computes like the value it saves; after the run,
    ``value`` is the tensor.
    """

    __slots__ = ("_save", "name")

    def __init__(self, tracer: Tracer, node: int, save: int, name: str | None):
        super().__init__(tracer, node)
        object.__setattr__(self, "_save", save)
        object.__setattr__(self, "name", name)

    @property
    def value(self) -> Any:
        """The saved tensor (raises ``iv.NotRunError`` before the program ran)."""
        result = self._tracer.result
        if result is None:
            raise NotRunError(
                f"{self!r} has no value yet: the program runs when the with-block exits, "
                "and only if iv.trace(model, inputs) was given inputs. Without inputs, run "
                "result = t.program.run(model, base, sources) and read result[saved]."
            )
        return result[self]

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"<saved value{label} %{self._save}>"


def _allowed(name: str) -> bool:
    try:
        resolve_function(name)
    except ProgramFormatError:
        return False
    return True


def _reject_inplace(name: str, kwargs: dict) -> None:
    """Refuse torch functions that would mutate a site's tensor behind the program's back."""
    namespace, _, attr = name.rpartition(".")
    if namespace != "operator" and attr.endswith("_") and not attr.startswith("_"):
        plain = name[:-1]
        fix = f"use the out-of-place {plain}" if _allowed(plain) else "compute out of place"
    elif kwargs.get("out") is not None:
        fix = "drop out= and use the returned value"
    elif kwargs.get("inplace") is True:
        fix = "drop inplace=True"
    else:
        return
    raise TraceError(
        f"in-place function {name!r} cannot be used on traced values: {fix}, or write to "
        "the site (t.<site>[...] = value)."
    )


def _find_tracer(x: Any) -> Tracer | None:
    if isinstance(x, Value):
        return x._tracer
    if isinstance(x, (tuple, list)):
        for item in x:
            found = _find_tracer(item)
            if found is not None:
                return found
    if isinstance(x, dict):
        return _find_tracer(list(x.values()))
    return None
