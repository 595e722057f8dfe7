"""The site vocabulary (DESIGN section 2): names, grammar and display.

A site is stored in programs as a canonical string:

- ``embed``, ``final``, ``logits``
- ``layer.{i}.{resid_pre,resid_mid,resid_post}``
- ``layer.{i}.attn.{q,k,v,z,pattern,out}`` and ``layer.{i}.attn.head.{h}.{q,k,v,z,pattern,out}``
- ``layer.{i}.mlp.{hidden,out}``
- ``module:{dotted.path}:{input,output}`` (any ``nn.Module``)
- ``hook:{hook_name}`` (TransformerLens hook points)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..errors import SiteError, closest

TOP_SITES = ("embed", "final", "logits")
LAYER_SITES = ("resid_pre", "resid_mid", "resid_post")
ATTN_SITES = ("q", "k", "v", "pattern", "z", "out")
HEAD_SITES = ("q", "k", "v", "pattern", "z", "out")
MLP_SITES = ("hidden", "out")

#: Children of each proxy level, for attribute checks and error messages.
CHILDREN: dict[str, tuple[str, ...]] = {
    "run": ("layer", *TOP_SITES),
    "layer": ("attn", "mlp", *LAYER_SITES),
    "attn": ("head", *ATTN_SITES),
    "head": HEAD_SITES,
    "mlp": MLP_SITES,
}

# [0-9], not \d (which takes Arabic-Indic and fullwidth digits); fullmatch, not $
# (which also matches before a final newline).
_LAYER_RE = re.compile(
    r"layer\.([0-9]+)\.(resid_pre|resid_mid|resid_post|mlp\.(hidden|out)"
    r"|attn\.(q|k|v|z|pattern|out)|attn\.head\.([0-9]+)\.(q|k|v|z|pattern|out))"
)
# Module paths and hook names: no whitespace, and a module path has no ":".
_MODULE_RE = re.compile(r"module:([^:\s]*):(input|output)")
_HOOK_RE = re.compile(r"hook:(\S+)")


@dataclass(frozen=True)
class Site:
    """A parsed site name.

    Attributes:
        name: The canonical string stored in programs.
        kind: ``"top"``, ``"layer"``, ``"module"`` or ``"hook"``.
        key: Vocabulary key without layer and head (``"attn.q"``, ``"resid_pre"``,
            ``"embed"``); the module path for ``module`` sites; the hook name for hooks.
        layer: Layer index, or ``None``.
        head: Head index for ``attn.head[h]`` sites, or ``None``.
        io: ``"input"`` / ``"output"`` for module sites.
    """

    name: str
    kind: Literal["top", "layer", "module", "hook"]
    key: str
    layer: int | None = None
    head: int | None = None
    io: Literal["input", "output"] | None = None

    def __str__(self) -> str:
        return display(self.name)

    @property
    def module_io(self) -> Literal["input", "output"]:
        """``io`` of a module site.

        Raises:
            SiteError: The site is not a module site (it has no ``io``).
        """
        if self.io is None:
            raise SiteError(
                f"{display(self.name)} is not a module site, so it has no input or output "
                "of its own; name a module site, module:{path}:input or :output."
            )
        return self.io


def parse(name: str) -> Site:
    """Parse a canonical site string.

    Raises:
        SiteError: ``name`` does not follow the site grammar.
    """
    if name in TOP_SITES:
        return Site(name, "top", name)
    m = _LAYER_RE.fullmatch(name) if isinstance(name, str) else None
    if m:
        layer, rest = int(m.group(1)), name.split(".", 2)[2]
        if m.group(5) is not None:
            return Site(name, "layer", "attn." + m.group(6), layer, int(m.group(5)))
        return Site(name, "layer", rest, layer)
    m = _MODULE_RE.fullmatch(name) if isinstance(name, str) else None
    if m:
        return Site(name, "module", m.group(1), io="input" if m.group(2) == "input" else "output")
    m = _HOOK_RE.fullmatch(name) if isinstance(name, str) else None
    if m:
        return Site(name, "hook", m.group(1))
    raise SiteError(
        f"{name!r} is not a site name; valid forms are embed, final, logits, "
        "layer.{i}.resid_pre, layer.{i}.attn.q, layer.{i}.attn.head.{h}.z, layer.{i}.mlp.out, "
        "module:{path}:output, hook:{name}."
    )


def display(name: str) -> str:
    """How a site reads in the DSL: ``layer.3.attn.head.2.z`` -> ``layer[3].attn.head[2].z``."""
    if name.startswith("module:"):
        _, path, io = name.split(":")
        return f"module({path!r}).{io}"
    if name.startswith("hook:"):
        return f"hook({name[5:]!r})"
    return re.sub(r"\b(layer|head)\.(\d+|\{h\})", r"\1[\2]", name)


def check_child(level: str, attr: str, where: str) -> None:
    """Raise an ``iv.SiteError`` if ``attr`` is not a child of proxy ``level``."""
    valid = CHILDREN[level]
    if attr not in valid:
        near = ", ".join(closest(attr, valid))
        raise SiteError(
            f"unknown site {where}.{attr}: closest valid names are {near} "
            f"(all: {', '.join(valid)})."
        )


def vocabulary(n_layers: int) -> list[str]:
    """All vocabulary site patterns, in forward order, for ``model.sites()``."""
    names = ["embed"]
    for i in range(n_layers):
        names += [f"layer.{i}.resid_pre"]
        names += [f"layer.{i}.attn.{s}" for s in ATTN_SITES]
        names += [f"layer.{i}.attn.head.{{h}}.{s}" for s in HEAD_SITES]
        names += [f"layer.{i}.resid_mid", f"layer.{i}.mlp.hidden", f"layer.{i}.mlp.out"]
        names += [f"layer.{i}.resid_post"]
    return names + ["final", "logits"]
