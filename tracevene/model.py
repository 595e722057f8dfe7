"""``iv.Model``: a torch module together with the backend that runs programs on it."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ArgumentError, ArgumentTypeError
from .runtime.engine import Backend, get_backend
from .sites.arch import causal_types

if TYPE_CHECKING:
    from .ir.program import Program
    from .result import Result
    from .runtime.cache import SourceCache


class Model:
    """A model wrapped for tracevene. Create with ``iv.wrap`` or ``iv.load``.

    Attributes:
        module (nn.Module): The torch module the backend runs.
        tokenizer (Any): The tokenizer used for string inputs (or ``None``).
        backend (Backend): The backend object (torch hooks, nnsight or TransformerLens).
    """

    def __init__(self, module: nn.Module, backend: Backend, tokenizer: Any = None):
        self.wrapped = module  # the caller's module: to_backend starts again from it
        with _keep_rng_state():  # building a TransformerLens bridge draws random numbers
            self.module = backend.prepare(module)
        self.backend = backend
        self.tokenizer = tokenizer
        self.resolver = backend.make_resolver(self.module)

    @property
    def n_layers(self) -> int | None:
        """Number of blocks (``None`` for modules without a site table)."""
        return self.resolver.n_layers

    @property
    def n_heads(self) -> int | None:
        """Number of attention (query) heads per block."""
        return self.resolver.n_heads

    @property
    def n_kv_heads(self) -> int | None:
        """Key/value heads per layer (fewer than ``n_heads`` with grouped-query attention)."""
        return self.resolver.n_kv_heads

    @property
    def d_model(self) -> int | None:
        """Width of the residual stream."""
        return self.resolver.d_model

    def sites(self) -> list[str]:
        """The vocabulary sites this model offers (``{h}`` stands for a head index)."""
        return self.resolver.sites()

    def check_site(self, site: str) -> None:
        """Raise a clear ``iv.SiteError`` if ``site`` is not valid here."""
        self.backend.check_site(self, site)

    def run(
        self,
        program: Program,
        base: Any,
        sources: Sequence[Any] = (),
        *,
        schedule: str = "auto",
        forward_kwargs: Mapping[str, Any] | None = None,
        source_cache: SourceCache | None = None,
        **args: Any,
    ) -> Result:
        """Run ``program`` on this model, with ``base`` and one input per source run.

        Thread-safe: runs on one model are serialised by a re-entrant lock of the
        module, held for the whole run (see docs/backends.md, Threads).

        Args:
            program: A recorded ``iv.Program``.
            base: Inputs of the base run (token ids, a dict, text, or a module's input).
            sources: Inputs of each source run, in order.
            schedule: ``"auto"``, ``"batched"`` (base and sources in one forward pass
                where the program allows) or ``"sequential"`` (one pass per run).
            forward_kwargs: Extra keyword arguments for every forward call.
            source_cache: An ``iv.SourceCache`` shared by runs over recurring sources.
            **args: Values of the placeholders (``t.arg(name)``).

        Returns:
            The saved values and the base run's output.

        Raises:
            ArgumentError: Wrong number of sources, or missing, unexpected or string
                placeholders.
        """
        if len(sources) != program.n_sources:
            raise ArgumentError(
                f"this program has {program.n_sources} source run(s) but got {len(sources)} "
                "source input(s): pass sources=[...] with one input per t.source()."
            )
        names = program.args
        missing = [a for a in names if a not in args]
        extra = [a for a in args if a not in names]
        if missing or extra:
            raise ArgumentError(
                f"placeholders: program needs {program.args or 'none'}; missing {missing}, "
                f"unexpected {extra}. Pass them as program.run(..., name=value)."
            )
        text = [k for k, v in args.items() if isinstance(v, (str, bytes))]
        if text:
            raise ArgumentError(
                f"placeholder {text[0]!r} is bound to the string {args[text[0]]!r}; "
                "placeholders take tensors and numbers (a position index, a scale), so "
                "bind it to one of those."
            )
        return self.backend.run(
            self,
            program,
            [base, *sources],
            args,
            dict(forward_kwargs or {}),
            schedule,
            source_cache,
        )

    def to_backend(self, name: str) -> Model:
        """The same weights under another backend (wrapping the caller's module anew).

        Args:
            name: ``"torch"``, ``"nnsight"`` or ``"transformer_lens"``.

        Returns:
            A new ``iv.Model`` with the same tokenizer.

        Raises:
            BackendError: Unknown name, or its package is not installed.
        """
        return Model(self.wrapped, get_backend(name), self.tokenizer)

    @property
    def device(self) -> torch.device:
        """Device of the module's first parameter (CPU if it has none).

        Read afresh on every call (nothing is cached, so a module moved with ``.to()``
        or given new parameters is seen at once).
        """
        p = first_parameter(self.module)
        return p.device if p is not None else _CPU

    def __repr__(self) -> str:
        arch = self.resolver.arch.name if self.resolver.arch else type(self.module).__name__
        return f"<tracevene.Model {arch} on {self.backend.name!r}>"


_CPU = torch.device("cpu")


def first_parameter(module: nn.Module) -> nn.Parameter | None:
    """``next(module.parameters(), None)``, found without building its generators.

    The same depth-first walk over ``_parameters`` and ``_modules`` that
    ``nn.Module.parameters`` makes (several times faster on a Hugging Face model,
    where it is read on every run). Where a module on the way walks its parameters or
    submodules its own way (a TransformerLens bridge), ``parameters()`` is asked.
    """
    p = _first_parameter(module, set())
    return next(module.parameters(), None) if p is _ASK else p


_ASK = object()  # the walk met a module with its own parameters() / named_modules()


def _first_parameter(module: nn.Module, seen: set[int]) -> Any:
    if not _plain_walk(type(module)):
        return _ASK
    seen.add(id(module))  # a module reached twice is walked once, as named_modules does
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        if child is not None and id(child) not in seen:
            p = _first_parameter(child, seen)
            if p is not None:
                return p
    return None


@functools.cache
def _plain_walk(cls: type) -> bool:
    """Whether ``cls`` walks its parameters and submodules as ``nn.Module`` does."""
    names = ("parameters", "named_parameters", "_named_members", "named_modules")
    return all(getattr(cls, n, None) is getattr(nn.Module, n) for n in names)


def wrap(model: nn.Module | Model, backend: str | None = None, tokenizer: Any = None) -> Model:
    """Wrap a model so programs can run on it.

    Args:
        model: A Hugging Face model, or any ``nn.Module``.
        backend: ``"torch"``, ``"nnsight"`` or ``"transformer_lens"``. ``None`` picks
            ``"transformer_lens"`` for TransformerLens objects and the reference
            ``"torch"`` backend for everything else: nnsight is imported only when
            named, since importing it patches ``Tensor.backward`` and every object
            process-wide.
        tokenizer: Tokenizer for string inputs.

    Returns:
        The wrapped model; the caller's module is not changed, and neither is the
        global torch random state.
    """
    if isinstance(model, Model):
        return model if backend in (None, model.backend.name) else model.to_backend(backend)
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"iv.wrap expects a torch nn.Module, got {type(model).__name__}: pass the model "
            "itself (e.g. AutoModelForCausalLM.from_pretrained(...)), or load one by name "
            "with iv.load(name_or_path)."
        )
    if model.training and _has_dropout(model):
        warnings.warn(
            f"{type(model).__name__} is in training mode, so dropout makes every run random; "
            "call model.eval() before wrapping unless you mean it.",
            stacklevel=2,
        )
    return Model(model, get_backend(backend or default_backend(model)), tokenizer)


def default_backend(model: nn.Module) -> str:
    """The backend ``wrap`` picks when none is named (never nnsight: name it to get it)."""
    if any(c.__module__.startswith("transformer_lens.") for c in type(model).__mro__):
        return "transformer_lens"  # HookedTransformer / TransformerBridge objects
    return "torch"


@contextlib.contextmanager
def _keep_rng_state() -> Iterator[None]:
    """Restore the CPU (and any initialised CUDA) torch random state on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def as_model(model: Any) -> Model:
    """``model`` itself if wrapped, else wrapped on the default (torch) backend."""
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        return wrap(model)
    raise ArgumentTypeError(
        f"expected a tracevene Model or a torch nn.Module, got {type(model).__name__}: pass "
        "iv.wrap(module) or the nn.Module itself."
    )


def load(name_or_path: str, backend: str | None = None, **from_pretrained_kwargs: Any) -> Model:
    """Load a Hugging Face model and its tokenizer with ``from_pretrained``.

    Args:
        name_or_path: Hub id or local directory.
        backend: As in ``iv.wrap``.
        **from_pretrained_kwargs: Passed to ``from_pretrained``.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path)
    auto = (
        transformers.AutoModelForCausalLM
        if config.model_type in _CAUSAL_TYPES
        else transformers.AutoModel
    )
    module = auto.from_pretrained(name_or_path, **from_pretrained_kwargs).eval()
    return wrap(module, backend, _tokenizer(name_or_path))


def _tokenizer(name_or_path: str) -> Any:
    """The tokenizer saved with a model, or ``None`` where there is none."""
    import transformers

    local = Path(name_or_path)
    if local.is_dir() and not any(local.glob(_TOKENIZER_FILES)):
        return None  # from_pretrained would build an empty tokenizer instead of failing
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None


_TOKENIZER_FILES = "*token*"  # tokenizer.json, tokenizer_config.json, special_tokens_map.json


_CAUSAL_TYPES = causal_types()


def _has_dropout(module: nn.Module) -> bool:
    """Whether training mode would make runs random (dropout-like modules with p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())
