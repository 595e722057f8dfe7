"""Per-architecture site tables: where each vocabulary site lives in a model.

Adding an architecture is adding one ``Arch`` entry; backends never branch
on the architecture. An entry holds every fact about its family: module paths
(``Hook``), TransformerLens hook names (``Lens``, the ``tl`` column), causal LM or
encoder, its language-model class, parallel attention, and why a site is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

from torch import nn

#: Where a hook reads and writes: the module's first input, its output, or the attention
#: probabilities computed inside it.
HookIO = Literal["input", "output", "pattern"]
#: Which tensor of a hook point: a module's (``HookIO``), or a TransformerLens hook point's.
PointIO = HookIO | Literal["hook"]
#: How a site's tensor is cut from the hooked tensor, besides a ``Chunk`` (see ``Hook``).
ViewKind = Literal["ident", "heads", "head_out", "resid_mid"]
#: How a site is cut from a TransformerLens hook point's tensor (see ``Lens``).
LensView = Literal["ident", "resid_mid", "head_out"]


class Point(NamedTuple):
    """A hook point of one pass: a module path (or hook name) and which of its tensors.

    Attributes:
        path: Module path, or a TransformerLens hook name.
        io: ``HookIO``, or ``"hook"`` for a TransformerLens hook point.
    """

    path: str
    io: PointIO


@dataclass(frozen=True)
class Chunk:
    """A view cutting part ``part`` of ``parts`` of the last dim, then its heads.

    Attributes:
        part: Which part (0-based).
        parts: How many parts the last dim holds (3 for a fused q, k, v projection).
        layout: ``"split"``: the parts are contiguous chunks; ``"interleaved"``: the last
            dim is heads x parts x head_dim.
    """

    part: int
    parts: int
    layout: Literal["split", "interleaved"] = "split"


@dataclass(frozen=True)
class Hook:
    """Where a vocabulary site is read and written.

    Attributes:
        path: Module path, relative to the base model; ``{layer}`` expands to the
            layer's path and ``{layer0}`` to the first layer's; a path starting with
            ``^`` is relative to the top module.
        io: ``"input"`` (first positional argument), ``"output"`` (the output, or its
            first element), or ``"pattern"`` (attention probabilities inside the
            attention module at ``path``).
        view: How the site's tensor is cut from the hooked tensor: ``"ident"``,
            ``"heads"`` (last dim -> heads x head_dim), a ``Chunk`` (part j of n of the
            last dim, then heads), ``"head_out"`` (one head's share of the output
            projection), ``"resid_mid"`` (layer input + attention output).
        heads: ``"q"`` for query heads, ``"kv"`` for key-value heads.
        order_as: ``(path, io)`` whose place in forward order this site takes, for a
            hook that runs elsewhere (attention probabilities) or whose module is
            registered out of execution order.
        sub: Tie-break among sites at one place in forward order.
    """

    path: str
    io: HookIO = "output"
    view: ViewKind | Chunk = "ident"
    heads: Literal["q", "kv"] = "q"
    order_as: tuple[str, HookIO] | None = None
    sub: int = 0


@dataclass(frozen=True)
class Lens:
    """Where a vocabulary site is on a TransformerLens engine (bridge or HookedTransformer).

    TransformerLens hook points already have the vocabulary's head axis, so heads
    need no cutting; ``attn.head[h]`` sites select a head on ``HEAD_DIM``.

    Attributes:
        names: Candidate hook names (``{i}``: layer); the first that runs wins.
        view: ``"ident"``, ``"resid_mid"`` (this hook's tensor plus
            ``blocks.{i}.hook_resid_pre``) or ``"head_out"`` (one head's share of the
            output, from ``blocks.{i}.attn.hook_z`` and ``W_O``).
    """

    names: tuple[str, ...]
    view: LensView = "ident"


@dataclass(frozen=True)
class Arch:
    """Where the vocabulary sites live in one family of Hugging Face models.

    Attributes:
        name: Family name shown in messages.
        model_types: Hugging Face ``config.model_type`` values this table serves.
        base: Name of the base model inside the LM-head model (``transformer`` in
            ``GPT2LMHeadModel``). Paths are relative to the base model; a path starting
            with ``^`` is relative to the top module (the LM head).
        layers: Path of the ``nn.ModuleList`` of blocks, relative to the base model.
        sites: Vocabulary key -> ``Hook``.
        unsupported: Vocabulary key -> why this family has no such site.
        unsupported_if: Vocabulary key -> ``(config flag, reason)``: the site is missing
            on models whose config sets the flag.
        causal: A causal language model (``iv.load`` uses ``AutoModelForCausalLM``);
            ``False`` for encoders.
        lm_class: The Hugging Face class with the family's language-model head, whose
            TransformerLens bridge adapter also serves a bare base model (without
            the head); ``""``: none.
        parallel: Attention and MLP both read resid_pre (so resid_mid does not
            exist): ``True`` always, or the config flag that says so per model.
        tl: Vocabulary key -> ``Lens`` on a TransformerLens bridge; empty: the
            transformer_lens backend offers no vocabulary sites for the family.
    """

    name: str
    model_types: tuple[str, ...]
    base: str
    layers: str
    sites: dict[str, Hook]
    unsupported: dict[str, str] = field(default_factory=dict)
    unsupported_if: dict[str, tuple[str, str]] = field(default_factory=dict)
    causal: bool = True
    lm_class: str = ""
    parallel: bool | str = False
    tl: dict[str, Lens] = field(default_factory=dict)


#: Why a model has no ``resid_mid`` when its attention and MLP run in parallel.
PARALLEL = (
    "this {name} model runs attention and MLP in parallel from resid_pre, so no residual "
    "exists between them; read attn.out and mlp.out instead"
)
#: Why a model without a language-model head has no ``logits``.
NO_HEAD = (
    "a bare base model has no language-model head: load the model with its head, e.g. "
    "AutoModelForCausalLM / AutoModelForMaskedLM, or read layer[-1].resid_post"
)


def unavailable(arch: Arch, key: str, config: Any) -> str | None:
    """Why ``arch`` has no site ``key`` on a model with this config (``None``: it has)."""
    if key in arch.unsupported:
        return arch.unsupported[key]
    flag, reason = arch.unsupported_if.get(key, (None, ""))
    if flag and getattr(config, flag, False):
        return reason
    parallel = arch.parallel is True or (
        isinstance(arch.parallel, str) and bool(getattr(config, arch.parallel, False))
    )
    if key == "resid_mid" and parallel:
        return PARALLEL.format(name=arch.name)
    return None


#: TransformerLens's own names on a ``HookedTransformer`` (3.x).
TL_HOOKED: dict[str, Lens] = {
    "embed": Lens(("blocks.0.hook_resid_pre",)),
    "resid_pre": Lens(("blocks.{i}.hook_resid_pre",)),
    "attn.q": Lens(("blocks.{i}.attn.hook_q",)),
    "attn.k": Lens(("blocks.{i}.attn.hook_k",)),
    "attn.v": Lens(("blocks.{i}.attn.hook_v",)),
    "attn.pattern": Lens(("blocks.{i}.attn.hook_pattern",)),
    "attn.z": Lens(("blocks.{i}.attn.hook_z",)),
    "attn.head_out": Lens(("blocks.{i}.hook_attn_out",), "head_out"),
    "attn.out": Lens(("blocks.{i}.hook_attn_out",)),
    "resid_mid": Lens(("blocks.{i}.hook_resid_mid",)),
    "mlp.hidden": Lens(("blocks.{i}.mlp.hook_post",)),
    "mlp.out": Lens(("blocks.{i}.hook_mlp_out",)),
    "resid_post": Lens(("blocks.{i}.hook_resid_post",)),
    "final": Lens(("unembed.hook_in",)),
    "logits": Lens(("unembed.hook_out",)),
}
#: The same on a pre-norm ``TransformerBridge``. Its ``hook_resid_mid`` is the input hook
#: of ``ln2`` (a write there reaches the MLP but not the residual stream), so resid_mid
#: is ``resid_pre + attn.out`` at ``hook_attn_out``, as on the torch backend.
TL_BRIDGE: dict[str, Lens] = {
    **TL_HOOKED,
    "attn.head_out": Lens(("blocks.{i}.attn.o.hook_out", "blocks.{i}.hook_attn_out"), "head_out"),
    "resid_mid": Lens(("blocks.{i}.hook_attn_out",), "resid_mid"),
    "final": Lens(("ln_final.hook_out", "unembed.hook_in")),
}
#: Post-LayerNorm encoders (BERT) on a bridge: before the residual add and the norm.
TL_POST_LN: dict[str, Lens] = {
    **TL_BRIDGE,
    "attn.out": Lens(("blocks.{i}.attn.o.hook_out",)),
    "resid_mid": Lens(("blocks.{i}.ln1.hook_out",)),
}

#: Blocks that norm the attention and MLP outputs before the residual add (OLMo 2, Gemma 3)
#: on a bridge: its hook_attn_out / hook_mlp_out are the post-norms' outputs, so attn.out
#: and mlp.out are the attention and MLP modules' own outputs, and resid_mid is resid_pre
#: plus the attention post-norm's output.
TL_POST_NORM: dict[str, Lens] = {
    **TL_BRIDGE,
    "attn.out": Lens(("blocks.{i}.attn.hook_out",)),
    "resid_mid": Lens(("blocks.{i}.ln1_post.hook_out",), "resid_mid"),
    "mlp.out": Lens(("blocks.{i}.mlp.hook_out",)),
}


def _attention_sites(qkv: dict[str, Hook], attn: str, o_proj: str) -> dict[str, Hook]:
    return {
        **qkv,
        "attn.pattern": Hook(attn, "pattern", order_as=(o_proj, "input"), sub=-1),
        "attn.z": Hook(o_proj, "input", "heads"),
        "attn.head_out": Hook(o_proj, "output", "head_out"),
    }


def _llama_like(name: str, types: tuple[str, ...], lm_class: str = "") -> Arch:
    attn, o_proj = "{layer}.self_attn", "{layer}.self_attn.o_proj"
    qkv = {
        "attn.q": Hook(attn + ".q_proj", "output", "heads", "q"),
        "attn.k": Hook(attn + ".k_proj", "output", "heads", "kv"),
        "attn.v": Hook(attn + ".v_proj", "output", "heads", "kv"),
    }
    return Arch(
        name, types, "model", "layers",
        {
            "embed": Hook("{layer0}", "input"),
            "resid_pre": Hook("{layer}", "input"),
            **_attention_sites(qkv, attn, o_proj),
            "attn.out": Hook(attn, "output"),
            "resid_mid": Hook(attn, "output", "resid_mid"),
            "mlp.hidden": Hook("{layer}.mlp.down_proj", "input"),
            "mlp.out": Hook("{layer}.mlp", "output"),
            "resid_post": Hook("{layer}", "output"),
            "final": Hook("norm", "output"),
            "logits": Hook("^lm_head", "output"),
        },
        lm_class=lm_class,
        tl=TL_BRIDGE,
    )  # fmt: skip


def _post_norm_like(name: str, types: tuple[str, ...], **fields) -> Arch:
    """Llama-like blocks that norm the attention output before the residual add.

    resid_mid is resid_pre plus post_attention_layernorm's output (which the module tree
    registers after the MLP, hence ``order_as``); attn.out and mlp.out stay the attention
    and MLP modules' outputs, before their post-norms.
    """
    arch = _llama_like(name, types)
    mid = Hook("{layer}.post_attention_layernorm", "output", "resid_mid",
               order_as=("{layer}.self_attn", "output"), sub=1)  # fmt: skip
    return replace(arch, sites={**arch.sites, "resid_mid": mid}, **fields)


_SOFTCAPPED_LOGITS = {
    "logits": (
        "final_logit_softcapping",
        "this model soft-caps its logits after lm_head (config.final_logit_softcapping), "
        "so no module outputs them; read t.output.logits, or t.module('lm_head').output "
        "for the logits before the cap",
    )
}


GPT2 = Arch(
    "GPT-2", ("gpt2",), "transformer", "h",
    {
        "embed": Hook("{layer0}", "input"),
        "resid_pre": Hook("{layer}", "input"),
        **_attention_sites(
            {
                f"attn.{x}": Hook("{layer}.attn.c_attn", "output", Chunk(j, 3))
                for j, x in enumerate("qkv")
            },
            "{layer}.attn",
            "{layer}.attn.c_proj",
        ),
        "attn.out": Hook("{layer}.attn", "output"),
        "resid_mid": Hook("{layer}.attn", "output", "resid_mid"),
        "mlp.hidden": Hook("{layer}.mlp.c_proj", "input"),
        "mlp.out": Hook("{layer}.mlp", "output"),
        "resid_post": Hook("{layer}", "output"),
        "final": Hook("ln_f", "output"),
        "logits": Hook("^lm_head", "output"),
    },
    lm_class="GPT2LMHeadModel",
    tl=TL_BRIDGE,
)  # fmt: skip

GPT_NEOX = Arch(
    "GPT-NeoX", ("gpt_neox",), "gpt_neox", "layers",
    {
        "embed": Hook("{layer0}", "input"),
        "resid_pre": Hook("{layer}", "input"),
        **_attention_sites(
            {
                f"attn.{x}": Hook("{layer}.attention.query_key_value", "output", Chunk(j, 3, "interleaved"))  # noqa: E501
                for j, x in enumerate("qkv")
            },
            "{layer}.attention",
            "{layer}.attention.dense",
        ),
        "attn.out": Hook("{layer}.attention", "output"),
        "resid_mid": Hook("{layer}.attention", "output", "resid_mid"),
        "mlp.hidden": Hook("{layer}.mlp.dense_4h_to_h", "input"),
        "mlp.out": Hook("{layer}.mlp", "output"),
        "resid_post": Hook("{layer}", "output"),
        "final": Hook("final_layer_norm", "output"),
        "logits": Hook("^lm_head", "output"),
    },
    lm_class="GPTNeoXForCausalLM",
    parallel="use_parallel_residual",
    tl=TL_BRIDGE,
)  # fmt: skip

BERT = Arch(
    "BERT", ("bert",), "bert", "encoder.layer",
    {
        "embed": Hook("{layer0}", "input"),
        "resid_pre": Hook("{layer}", "input"),
        **_attention_sites(
            {
                f"attn.{x}": Hook(f"{{layer}}.attention.self.{name}", "output", "heads")
                for x, name in zip("qkv", ("query", "key", "value"), strict=True)
            },
            "{layer}.attention.self",
            "{layer}.attention.output.dense",
        ),
        "attn.out": Hook("{layer}.attention.output.dense", "output"),
        "resid_mid": Hook("{layer}.attention", "output"),
        "mlp.hidden": Hook("{layer}.output.dense", "input"),
        "mlp.out": Hook("{layer}.output.dense", "output"),
        "resid_post": Hook("{layer}", "output"),
        "logits": Hook("^cls.predictions", "output"),
    },
    unsupported={
        "final": "BERT is post-LayerNorm and has no final norm; read layer[-1].resid_post",
    },
    causal=False,
    lm_class="BertForMaskedLM",
    tl=TL_POST_LN,
)  # fmt: skip

LLAMA = _llama_like("Llama", ("llama",), "LlamaForCausalLM")
MISTRAL = _llama_like("Mistral", ("mistral",), "MistralForCausalLM")
QWEN2 = _llama_like("Qwen2", ("qwen2",), "Qwen2ForCausalLM")
GEMMA = _llama_like("Gemma", ("gemma",), "GemmaForCausalLM")
QWEN3 = _llama_like("Qwen3", ("qwen3",), "Qwen3ForCausalLM")
GEMMA2 = _post_norm_like(
    "Gemma 2", ("gemma2",), unsupported_if=_SOFTCAPPED_LOGITS, lm_class="Gemma2ForCausalLM",
    tl={},  # its bridge's post-norm hook names are not mapped yet: t.hook / t.module there
)  # fmt: skip
# OLMo 2: no norm before attention or MLP, only after each (post_attention_layernorm,
# post_feedforward_layernorm, both registered after the MLP); q_norm / k_norm over all
# heads after q_proj / k_proj, so attn.q / attn.k are the projections' outputs.
OLMO2 = _post_norm_like("OLMo 2", ("olmo2",), lm_class="Olmo2ForCausalLM", tl=TL_POST_NORM)

# GPT-J: attention and MLP in parallel from ln_1. Its attention is its own _attn (no
# attention interface): the pattern is attn_dropout's input (the probabilities before
# dropout, as on the eager route), which the tree registers before q/k/v_proj, hence
# order_as; q_proj runs before k_proj but is registered after it.
_GPTJ_ATTN = "{layer}.attn"
GPTJ = Arch(
    "GPT-J", ("gptj",), "transformer", "h",
    {
        "embed": Hook("{layer0}", "input"),
        "resid_pre": Hook("{layer}", "input"),
        "attn.q": Hook(_GPTJ_ATTN + ".q_proj", "output", "heads",
                       order_as=(_GPTJ_ATTN + ".k_proj", "input"), sub=-1),
        "attn.k": Hook(_GPTJ_ATTN + ".k_proj", "output", "heads"),
        "attn.v": Hook(_GPTJ_ATTN + ".v_proj", "output", "heads"),
        "attn.pattern": Hook(_GPTJ_ATTN + ".attn_dropout", "input",
                             order_as=(_GPTJ_ATTN + ".out_proj", "input"), sub=-1),
        "attn.z": Hook(_GPTJ_ATTN + ".out_proj", "input", "heads"),
        "attn.head_out": Hook(_GPTJ_ATTN + ".out_proj", "output", "head_out"),
        "attn.out": Hook(_GPTJ_ATTN, "output"),
        "mlp.hidden": Hook("{layer}.mlp.fc_out", "input"),
        "mlp.out": Hook("{layer}.mlp", "output"),
        "resid_post": Hook("{layer}", "output"),
        "final": Hook("ln_f", "output"),
        "logits": Hook("^lm_head", "output"),
    },
    lm_class="GPTJForCausalLM",
    parallel=True,
    tl=TL_BRIDGE,
)  # fmt: skip
# Gemma 3 text: Gemma 2's four norms plus q_norm / k_norm per head (attn.q / attn.k at
# q_proj / k_proj outputs, before them); scaled by query_pre_attn_scalar, which the
# attention module passes on as its scaling.
GEMMA3 = _post_norm_like(
    "Gemma 3", ("gemma3_text",), unsupported_if=_SOFTCAPPED_LOGITS,
    lm_class="Gemma3ForCausalLM", tl=TL_POST_NORM,
)  # fmt: skip

ARCHES: tuple[Arch, ...] = (
    GPT2, GPT_NEOX, LLAMA, MISTRAL, QWEN2, GEMMA, QWEN3, GEMMA2, OLMO2, GEMMA3, GPTJ,
    BERT,
)  # fmt: skip

#: TransformerLens's own architecture: hook points only, no Hugging Face modules (so
#: no model types and no ``Hook`` paths); ``parallel`` is its ``cfg`` flag.
HOOKED_TRANSFORMER = Arch(
    "HookedTransformer", (), "", "blocks", {}, parallel="parallel_attn_mlp", tl=TL_HOOKED
)


def causal_types() -> frozenset[str]:
    """The ``config.model_type`` values of every causal language-model family."""
    return frozenset(t for arch in ARCHES if arch.causal for t in arch.model_types)


def find_arch(module: nn.Module) -> tuple[Arch, str] | None:
    """The table for a Hugging Face model, and the path prefix of its base model.

    Returns:
        ``(arch, prefix)`` where ``prefix`` is ``"transformer."`` for
        ``GPT2LMHeadModel`` and ``""`` for a bare ``GPT2Model``; ``None`` for modules
        that no table covers.
    """
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    for arch in ARCHES:
        if model_type in arch.model_types:
            names = dict(module.named_modules())
            for prefix in (arch.base + ".", ""):
                if prefix + arch.layers in names:
                    return arch, prefix
    return None
