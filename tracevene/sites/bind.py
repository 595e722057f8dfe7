"""Binding site names to hook points of one concrete model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from ..errors import ArgumentTypeError, SiteError, closest
from . import views
from .arch import NO_HEAD, Arch, Chunk, Hook, HookIO, Point, PointIO, find_arch, unavailable
from .views import HEAD_DIM, Getter, Setter, View
from .views import Ctx as Ctx  # re-exported: the runtime builds a Ctx per hook firing
from .vocab import Site, display, parse, vocabulary


@dataclass(frozen=True)
class Binding:
    """A site bound to one model: where to hook, and how to cut the tensor.

    Attributes:
        site: The parsed site.
        path: Module path of the hook.
        io: ``"input"``, ``"output"``, ``"pattern"``, or ``"hook"`` (a TransformerLens
            hook point).
        order: Sort key of the site in forward order.
        get: ``get(hooked_rows, ctx) -> site tensor``.
        set: ``set(hooked_rows, new_site_tensor, ctx) -> new hooked tensor``.
        captures: Hook points the view needs captured earlier in the forward.
    """

    site: Site
    path: str
    io: PointIO
    order: tuple[int, ...]
    get: Getter
    set: Setter
    captures: tuple[Point, ...] = ()

    @property
    def point(self) -> Point:
        """The hook point this site is read and written at."""
        return Point(self.path, self.io)


def module_order(root: nn.Module) -> dict[str, tuple[int, int, int]]:
    """``path -> (pre-order index, index of last descendant, depth)`` for every module."""
    order: dict[str, tuple[int, int, int]] = {}
    names = [name for name, _ in root.named_modules()]
    for i, name in enumerate(names):
        prefix = name + "." if name else ""
        last = i
        while last + 1 < len(names) and names[last + 1].startswith(prefix):
            last += 1
        order[name] = (i, last, name.count(".") + bool(name))
    return order


class SiteResolver(Protocol):
    """What engines and the runtime use of a resolver: one per wrapped model.

    Its sizes (``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_model``, ``d_head``) are
    ``None`` on a model without a site table.
    """

    @property
    def arch(self) -> Arch | None:
        """The model's site table (its ``name`` is shown in messages), or ``None``."""
        ...

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Module path -> module, for ``t.module(path)`` sites and hooks."""
        ...

    @property
    def plain(self) -> nn.Module | None:
        """The Hugging Face module to call without any hook, or ``None``.

        Generation's plain steps and a patching sweep's clean prefix call it.
        """
        ...

    @property
    def blocks(self) -> nn.ModuleList | None:
        """The blocks as the engine calls them, in forward order, or ``None``.

        A pass may then start at a later block (``runtime/skip.py``); ``None`` where
        the engine does not call them itself or there is no site table.
        """
        ...

    @property
    def n_layers(self) -> int | None:
        """Blocks."""
        ...

    @property
    def n_heads(self) -> int | None:
        """Query heads per block."""
        ...

    @property
    def n_kv_heads(self) -> int | None:
        """Key-value heads per block."""
        ...

    @property
    def d_model(self) -> int | None:
        """Width of the residual stream."""
        ...

    @property
    def d_head(self) -> int | None:
        """Width of one head."""
        ...

    def sites(self) -> list[str]:
        """Vocabulary sites this model offers, in forward order."""
        ...

    def check(self, name: str) -> Site:
        """Parse and validate a site name (``iv.SiteError`` if it is not valid here)."""
        ...

    def bind(self, name: str) -> Binding:
        """The ``Binding`` of a site name (validated, cached)."""
        ...


class Resolver:
    """Binds site names to the module hooks of one model (cached): torch and nnsight."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.plain = module
        self.modules = dict(module.named_modules())
        self._order = module_order(module)
        found = find_arch(module)
        self.arch: Arch | None = found[0] if found else None
        self.prefix = found[1] if found else ""
        self._cache: dict[str, Binding] = {}
        self.n_layers: int | None = None
        self.n_heads: int | None = None
        self.n_kv_heads: int | None = None
        self.d_model: int | None = None
        self.d_head: int | None = None
        self.blocks: nn.ModuleList | None = None
        if self.arch is not None:  # find_arch found a Hugging Face config
            self.blocks = cast(nn.ModuleList, self.modules[self.prefix + self.arch.layers])
            self._sizes(module.config, self.blocks)

    def _sizes(self, config: Any, layers: nn.Module) -> None:
        """Layer, head and width counts from a Hugging Face config (any family's)."""
        self.n_layers = len(cast(nn.ModuleList, layers))
        n_heads: int = config.num_attention_heads
        self.n_heads = n_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
        self.d_model = d_model = config.hidden_size
        self.d_head = getattr(config, "head_dim", None) or d_model // n_heads

    # -- names ---------------------------------------------------------------
    def sites(self) -> list[str]:
        """Vocabulary sites this model offers, in forward order (``{h}``: any head)."""
        return [] if self.n_layers is None else offered(self.check, self.n_layers)

    def check(self, name: str) -> Site:
        """Parse and validate a site name for this model (without binding hooks).

        Raises:
            SiteError: Unknown name, layer or head out of range, or a site this
                architecture does not have.
        """
        site = parse(name)
        if site.kind == "hook":
            raise SiteError(
                f"{display(name)} names a TransformerLens hook point; hook sites need the "
                "transformer_lens backend. On this backend use t.module(path).output."
            )
        if site.kind == "module":
            self._module(site.key)
            return site
        if self.arch is None:
            paths = [repr(n) for n in self.modules if n][:6]
            some = f" (paths here: {', '.join(paths)}{', ...' if len(paths) == 6 else ''})"
            raise SiteError(
                f"{display(name)}: this {type(self.module).__name__} has no mapped "
                "architecture (no site table), so vocabulary sites such as t.logits or "
                "t.layer[i] do not exist on it. Read and write its modules instead with "
                "t.module(path).output or .input, where path is a name from "
                "module.named_modules() and '' is the module itself"
                f"{some if paths else ''}."
            )
        config = getattr(self.module, "config", None)
        key = available_key(self, site, display(name), self.arch, self.arch.sites, config)
        path = self._path(self.arch.sites[key].path, site.layer)
        if path not in self.modules:
            hint = f" ({NO_HEAD})" if key == "logits" else ""
            raise SiteError(
                f"{display(name)} is not available on this {type(self.module).__name__}: it "
                f"has no module {path!r}{hint}."
            )
        return site

    def _module(self, path: str) -> nn.Module:
        if path not in self.modules:
            near = ", ".join(repr(p) for p in closest(path, [n for n in self.modules if n]))
            raise SiteError(f"no module {path!r} in this model; closest paths: {near}.")
        return self.modules[path]

    # -- binding -------------------------------------------------------------
    def bind(self, name: str) -> Binding:
        """The ``Binding`` of a site name (validated, cached)."""
        if name not in self._cache:
            self._cache[name] = self._bind(self.check(name))
        return self._cache[name]

    def _bind(self, site: Site) -> Binding:
        if site.kind == "module":
            order = (*self._key(site.key, site.module_io), 0)
            return Binding(site, site.key, site.module_io, order, *views.IDENT)
        hook = self._table().sites[table_key(site)]
        path = self._path(hook.path, site.layer)
        self._module(path)
        order_path, order_io = hook.order_as or (hook.path, hook.io)
        order = (*self._key(self._path(order_path, site.layer), order_io), hook.sub)
        get, put = self._view(hook, site)
        captures: tuple[Point, ...] = ()
        if hook.view == "resid_mid":
            captures = (Point(self._path("{layer}", site.layer), "input"),)
        return Binding(site, path, hook.io, order, get, put, captures)

    def _table(self) -> Arch:
        """The site table (``check`` refused vocabulary sites on a model without one)."""
        assert self.arch is not None, "check() runs before a vocabulary site is bound"
        return self.arch

    def _path(self, template: str, layer: int | None) -> str:
        if template.startswith("^"):
            return template[1:]
        layers = self.prefix + self._table().layers
        return self.prefix + template if "{" not in template else template.format(
            layer=f"{layers}.{layer}", layer0=f"{layers}.0"
        )

    def _key(self, path: str, io: HookIO) -> tuple[int, int]:
        pre, last, depth = self._order[path]
        return (2 * pre, depth) if io == "input" else (2 * last + 1, -depth)

    def _view(self, hook: Hook, site: Site) -> View:
        n = self.n_kv_heads if hook.heads == "kv" else self.n_heads
        dh = self.d_head
        assert n is not None and dh is not None, "a model with a site table has its sizes"
        if hook.view == "head_out":
            assert site.head is not None, "only attn.head[h].out has the head_out view"
            return _head_out(site.head, dh)
        if hook.view == "resid_mid":
            view = views.resid_mid(Point(self._path("{layer}", site.layer), "input"))
        elif hook.view == "heads":
            view = views.heads(n, dh)
        elif isinstance(hook.view, Chunk):
            make = views.heads if hook.view.layout == "split" else views.interleaved
            view = make(n, dh, hook.view.part, hook.view.parts)
        else:
            view = views.IDENT
        return head_of(view, site)


def _head_out(h: int, dh: int) -> View:
    """Head ``h``'s share of an output projection's output, from the projection's input."""

    def z(ctx: Ctx) -> Tensor:
        assert ctx.input is not None, "an output hook's Ctx holds the module's input"
        return ctx.input[ctx.rows][..., h * dh : (h + 1) * dh]

    return views.head_out(h, z, lambda ctx: views.head_weight(ctx.module, h, dh))


def table_key(site: Site) -> str:
    """The table key of a vocabulary site (``attn.head[h].out`` is ``attn.head_out``)."""
    return "attn.head_out" if site.key == "attn.out" and site.head is not None else site.key


def available_key(
    resolver: SiteResolver, site: Site, where: str, arch: Arch, columns: Mapping[str, Any],
    config: Any, engine: str = "",
) -> str:
    """The table key of ``site`` once its layer and head are in range and its family offers it.

    Args:
        resolver: The resolver binding it (its sizes).
        site: The parsed vocabulary site.
        where: The site as the messages name it.
        arch: The family's table entry.
        columns: The table column the engine binds from (``arch.sites`` or ``arch.tl``).
        config: The model's config, for sites that depend on it.
        engine: Appended to the "not available on ... models" message (e.g. " on the
            transformer_lens backend").

    Raises:
        SiteError: Out of range, unavailable on this model, or not in the column.
    """
    n_layers, n_heads, n_kv_heads = resolver.n_layers, resolver.n_heads, resolver.n_kv_heads
    assert n_layers is not None and n_heads is not None and n_kv_heads is not None, (
        "a resolver with a site table has its sizes"
    )
    check_range(site, where, n_layers, n_heads, n_kv_heads)
    key = table_key(site)
    reason = unavailable(arch, key, config)
    if reason:
        raise SiteError(f"{where} is not available: {reason}.")
    if key not in columns:
        raise SiteError(
            f"{where} is not available on {arch.name} models{engine} "
            f"(sites: {', '.join(sorted(columns))})."
        )
    return key


def head_of(view: View, site: Site) -> View:
    """``view`` narrowed to the site's head, if it names one."""
    return view if site.head is None else views.select_head(view, HEAD_DIM[site.key], site.head)


def offered(check: Callable[[str], Any], n_layers: int) -> list[str]:
    """The vocabulary sites ``check`` accepts, in forward order, in DSL form."""
    out = []
    for name in vocabulary(n_layers):
        try:
            check(name.replace("{h}", "0"))
        except SiteError:
            continue
        out.append(display(name))
    return out


def check_range(site: Site, where: str, n_layers: int, n_heads: int, n_kv_heads: int) -> None:
    """Raise an ``iv.SiteError`` saying the range if a layer or head index is outside it."""
    if site.layer is not None and not 0 <= site.layer < n_layers:
        raise SiteError(
            f"layer {site.layer} is out of range: this model has layers "
            f"0..{n_layers - 1} (negative indices count from the end)."
        )
    if site.head is not None:
        n = n_kv_heads if site.key in ("attn.k", "attn.v") else n_heads
        if not 0 <= site.head < n:
            what = "key/value heads" if n != n_heads else "heads"
            raise SiteError(
                f"head {site.head} is out of range for {where}: layer {site.layer} has "
                f"{what} 0..{n - 1}."
            )


def first_tensor(x: Any) -> Tensor:
    """The tensor a module produced: itself, or the first element of a tuple/output."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    to_tuple = getattr(x, "to_tuple", None)
    if to_tuple is not None:
        return first_tensor(to_tuple())
    raise ArgumentTypeError(
        f"expected a tensor or a tuple starting with one, got {type(x).__name__}: a hooked "
        "module must return a tensor, a tuple whose first element is one, or a model output "
        "with .to_tuple(); read another site, or a submodule that returns a tensor."
    )
