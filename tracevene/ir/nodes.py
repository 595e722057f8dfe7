"""The intervention-program IR: frozen nodes with a closed op vocabulary."""

from __future__ import annotations

import math
import operator
import types
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import ProgramFormatError, TraceError

#: The closed op vocabulary. Every node has exactly one of these ops.
Op = Literal[
    "arg", "const", "read", "write", "getitem", "setitem",
    "call_function", "call_method", "call_module", "save",
]  # fmt: skip

#: What each op means (the keys are exactly ``Op``'s values).
OPS: dict[Op, str] = {
    "arg": "placeholder bound when the program runs (target: its name)",
    "const": "a tensor stored with the program (target: its key)",
    "read": "the value of a site in one run (run, target: site)",
    "write": "replace site[index] in one run by a value (run, target: site; args: index, value)",
    "getitem": "x[index] (args: x, index)",
    "setitem": "a copy of x with x[index] = value (args: x, index, value)",
    "call_function": "an allowed function (target: qualified name, e.g. torch.cat, operator.add)",
    "call_method": "an allowed tensor method (target: method name; args[0] is the tensor)",
    "call_module": "an intervention module of the program (target: its key)",
    "save": "keep a value for after the run (args: x; target: name or None)",
}

_NAMESPACES: dict[str, Any] = {
    "torch": torch,
    "torch.nn.functional": torch.nn.functional,
    "torch.linalg": torch.linalg,
    "torch.special": torch.special,
    "torch.fft": torch.fft,
    "operator": operator,
}

# Tensor methods that would break the program's semantics or leave the tensor world.
_DENIED_METHODS = frozenset(
    {
        "backward", "register_hook", "register_post_accumulate_grad_hook", "retain_grad",
        "numpy", "tolist", "storage", "untyped_storage", "data_ptr", "share_memory_",
        "pin_memory", "set_", "resize_", "apply_", "map_", "map2_", "__setitem__",
        "__setstate__", "__reduce_ex__", "__reduce__", "__deepcopy__", "__array__",
        "__dlpack__", "__del__", "__init__", "__new__", "__init_subclass__",
        # reflection: would reach arbitrary attributes / objects (and so eval) from a file
        "__getattribute__", "__getattr__", "__setattr__", "__delattr__", "__class__",
        "__dir__", "__subclasshook__", "__getstate__", "__torch_function__",
        "__torch_dispatch__", "__array_wrap__", "__format__", "__sizeof__",
    }
)  # fmt: skip
# In-place operator dunders (x += y on a real tensor) mutate their argument.
_INPLACE_DUNDERS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "div", "truediv", "floordiv", "mod", "pow",
                            "matmul", "and", "or", "xor", "lshift", "rshift")
) | {"__delitem__"}  # fmt: skip
# Attributes of tensors themselves (dir() leaves out the metaclass: no __call__, mro, ...).
_TENSOR_ATTRS = frozenset(dir(torch.Tensor))
#: operator.* functions a program may call (also as __name__ dunders): pure, out-of-place.
OPERATORS = frozenset(
    {"abs", "add", "and", "eq", "floordiv", "ge", "getitem", "gt", "index", "inv", "invert",
     "le", "lshift", "lt", "matmul", "mod", "mul", "ne", "neg", "not", "or", "pos", "pow",
     "rshift", "sub", "truediv", "truth", "xor"}
)  # fmt: skip
# torch.* functions that touch files or global state, or call callables: never in a program.
_DENIED_FUNCTIONS = frozenset(
    {"load", "save", "from_file", "get_file_path", "import_ir_module",
     "import_ir_module_from_buffer", "compile", "vmap", "cond", "while_loop", "fork", "wait",
     "manual_seed", "seed", "use_deterministic_algorithms", "init_num_threads",
     "prepare_multiprocessing_environment", "autocast_increment_nesting",
     "autocast_decrement_nesting", "clear_autocast_cache", "thread_safe_generator",
     "classproperty", "get_device_module", "from_dlpack", "handle_torch_function",
     "boolean_dispatch", "profiler_allow_cudagraph_cupti_lazy_reinit_cuda12"}
)  # fmt: skip


def _allowed_function(namespace: str, attr: str, fn: Any) -> bool:
    """Whether ``namespace.attr`` (the object ``fn``) may be called by a program."""
    if not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType)):
        return False  # classes (file readers, compilers, storages), typing forms, ...
    if namespace == "operator":
        return attr.strip("_") in OPERATORS  # not attrgetter / call / methodcaller / iadd
    return not attr.startswith(("_", "set_")) and attr not in _DENIED_FUNCTIONS


@dataclass(frozen=True)
class Ref:
    """A reference to the value of an earlier node."""

    id: int

    def __repr__(self) -> str:
        return f"%{self.id}"


@dataclass(frozen=True)
class Node:
    """One step of an intervention program.

    Args:
        id: Position of the node in the program (nodes refer to earlier ids only).
        op: One of ``OPS``.
        target: Site, function, method, module key, placeholder or save name.
        run: For ``read`` / ``write``: 0 is the base run, k >= 1 the k-th source.
        args: Positional arguments: ``Ref``, numbers, strings, ``None``,
            slices, ``...``, dtypes, and tuples / lists of those.
        kwargs: Keyword arguments as ``(name, value)`` pairs.
        loc: The user's ``file:line`` that recorded the node.
    """

    id: int
    op: Op
    target: str | None = None
    run: int | None = None
    args: tuple = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    loc: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # NaN != NaN: hold the one math.nan object, so a loaded program equals its original.
        object.__setattr__(self, "args", _same_nan(self.args))
        object.__setattr__(self, "kwargs", _same_nan(self.kwargs))

    @property
    def key(self) -> str:
        """``target`` of a node whose op has one (every op but an unnamed ``save``).

        Raises:
            ProgramFormatError: The node has no target (``Program.validate`` refuses
                such read, write, arg and call nodes).
        """
        if self.target is None:
            raise ProgramFormatError(
                f"node %{self.id} ({self.op}) has no target; a {self.op} node names its "
                "site, function, method, module or placeholder: record it again, or fix "
                "the program file."
            )
        return self.target

    @property
    def run_index(self) -> int:
        """``run`` of a ``read`` / ``write`` node: 0 for the base, k for the k-th source.

        Raises:
            ProgramFormatError: The node has no run (``Program.validate`` refuses reads
                and writes without one).
        """
        if self.run is None:
            raise ProgramFormatError(
                f"node %{self.id} ({self.op}) has no run; a read or write names its run "
                "(0: base, k: the k-th source): record it again, or fix the program file."
            )
        return self.run

    def refs(self) -> list[int]:
        """Ids of the nodes this node reads."""
        out: list[int] = []
        _collect_refs((self.args, tuple(v for _, v in self.kwargs)), out)
        return out


def _same_nan(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return math.nan
    if isinstance(x, tuple):
        return tuple(_same_nan(v) for v in x)
    if isinstance(x, list):
        return [_same_nan(v) for v in x]
    if isinstance(x, slice):
        return slice(_same_nan(x.start), _same_nan(x.stop), _same_nan(x.step))
    return x


def _collect_refs(x: Any, out: list[int]) -> None:
    if isinstance(x, Ref):
        out.append(x.id)
    elif isinstance(x, (tuple, list)):
        for item in x:
            _collect_refs(item, out)
    elif isinstance(x, slice):
        _collect_refs((x.start, x.stop, x.step), out)


def resolve_function(name: object) -> Any:
    """The function an allowed qualified name refers to, never importing anything.

    Raises:
        ProgramFormatError: ``name`` is not ``torch.*`` / ``operator.*`` (and friends).
    """
    namespace, _, attr = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    module = _NAMESPACES.get(namespace)
    fn = getattr(module, attr, None) if module is not None else None
    if not _allowed_function(namespace, attr, fn):
        allowed = ", ".join(f"{ns}.*" for ns in _NAMESPACES)
        raise ProgramFormatError(
            f"function {name!r} is not allowed in a program; allowed are {allowed} "
            "(tensor maths only: no file, global-state or reflection functions). "
            "Write the computation with those, or inside a registered intervention module."
        )
    return fn


_FUNCTION_NAMES: dict[int, str] | None = None


def function_name(fn: Any) -> str | None:
    """The allowed qualified name of ``fn``, or ``None`` if it has none."""
    global _FUNCTION_NAMES
    if _FUNCTION_NAMES is None:
        names: dict[int, str] = {}
        for ns, module in reversed(list(_NAMESPACES.items())):
            for attr in dir(module):
                obj = getattr(module, attr, None)
                if _allowed_function(ns, attr, obj):
                    names.setdefault(id(obj), f"{ns}.{attr}")
        _FUNCTION_NAMES = names
    return _FUNCTION_NAMES.get(id(fn))


def check_method(name: object, error: type[Exception] = TraceError) -> str:
    """Validate a tensor method name for ``call_method`` nodes.

    Raises:
        error: The method mutates in place, leaves the tensor world, or does not exist.
    """
    if not isinstance(name, str):
        raise error(f"tensor method name {name!r} is not a string.")
    dunder = name.startswith("__") and name.endswith("__")
    if name in _DENIED_METHODS or (name.startswith("_") and not dunder):
        raise error(f"tensor method {name!r} cannot be used in a program.")
    if (name.endswith("_") and not dunder) or name in _INPLACE_DUNDERS:
        out_of_place = f"__{name[3:]}" if dunder else name[:-1]
        raise error(
            f"in-place tensor method {name!r} cannot be used on traced values: use "
            f"the out-of-place {out_of_place!r}, or write to the site (t.<site>[...] = value)."
        )
    if name not in _TENSOR_ATTRS or not callable(getattr(torch.Tensor, name, None)):
        raise error(f"{name!r} is not a tensor method.")
    return name
