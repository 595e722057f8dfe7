"""Independent references for the programs in dsl/conformance/ (one per program).

Nothing here goes through tracevene: each reference runs the Hugging Face model with
plain ``register_forward_hook`` / ``register_forward_pre_hook`` hooks, computes
per-head views by hand from the modules' tensors, and gets attention probabilities from
an eager attention function of its own (registered with ``transformers.AttentionInterface``
while a reference runs). Where a site has a second natural hook point, the reference
uses the other one (embed at the embedding module's output, resid_mid at the input of
the norm that follows it, mlp.hidden at the activation's output), so both agree only if
the site means what the vocabulary says.

A reference is ``fn(model, base, sources, **args) -> {save name: tensor}``; keys
``"output.<field>"`` (``logits``, or ``last_hidden_state`` for encoders) are compared
with that field of the base run's model output.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor, nn

REFS: dict[str, Callable[..., dict[str, Tensor]]] = {}


def ref(stem: str):
    """Register the reference of the program ``dsl/conformance/{stem}.py``."""

    def deco(fn):
        REFS[stem] = fn
        return fn

    return deco


class _Index:
    def __getitem__(self, index):
        return index


ix = _Index()  # ix[:, 4] -> (slice(None), 4)


# -- sites: where to hook, and how to cut the hooked tensor -------------------------------
@dataclass(frozen=True)
class Site:
    """A hook point and a view on it.

    ``io``: ``"pre"`` (first input), ``"post"`` (output, or its first element) or
    ``"attn"`` (attention probabilities inside the attention module at ``path``).
    ``get(x, inp)`` cuts the site from the hooked tensor (``inp``: the module's input, for
    output hooks); ``put(x, new, inp)`` returns the hooked tensor with the site replaced.
    """

    path: str
    io: str
    get: Callable[[Tensor, Any], Tensor] = lambda x, inp: x
    put: Callable[[Tensor, Tensor, Any], Tensor] = lambda x, new, inp: new


def _heads(n: int, dh: int, part: int = 0):
    """View chunk ``part`` (width n*dh) of the last dim as [..., n, dh]."""
    lo, hi = part * n * dh, (part + 1) * n * dh

    def get(x, inp):
        return x[..., lo:hi].reshape(*x.shape[:-1], n, dh)

    def put(x, new, inp):
        return torch.cat([x[..., :lo], new.reshape(*new.shape[:-2], n * dh), x[..., hi:]], -1)

    return get, put


def _neox_qkv(n: int, dh: int, j: int):
    """NeoX's query_key_value output viewed as [B, P, H, 3, Dh]: part j."""

    def get(x, inp):
        return x.view(*x.shape[:-1], n, 3, dh)[..., j, :]

    def put(x, new, inp):
        y = x.view(*x.shape[:-1], n, 3, dh).clone()
        y[..., j, :] = new
        return y.view(x.shape)

    return get, put


def head(site: Site, h: int, dim: int) -> Site:
    """One head's slice of a per-head site (heads on ``dim``)."""
    sel = (slice(None),) * dim + (h,)

    def put(x, new, inp):
        full = site.get(x, inp).clone()
        full[sel] = new
        return site.put(x, full, inp)

    return Site(site.path, site.io, lambda x, inp: site.get(x, inp)[sel], put)


def _o_rows(o_proj: nn.Module, h: int, dh: int) -> Tensor:
    """[dh, d_model]: the rows of the output projection that head h writes through."""
    w = o_proj.weight
    if isinstance(o_proj, nn.Linear):  # [out, in]
        return w[:, h * dh : (h + 1) * dh].T
    return w[h * dh : (h + 1) * dh]  # GPT-2 Conv1D: [in, out]


_HEAD_OUT_WRITES: dict[int, dict[int, Tensor]] = {}  # id(z) -> head -> added by writes


def head_out(model: nn.Module, layer: int, h: int) -> Site:
    """Head h's contribution to the residual, z_h @ W_O[h] (no bias), plus what writes to
    it added in this forward (kept per z tensor); a write adds (new - old) to the output.
    """
    o_path = sites(model, layer)["z"].path
    o_proj = model.get_submodule(o_path)
    dh = _dims(model, layer)[2]

    def get(x, z):
        added = _HEAD_OUT_WRITES.get(id(z), {}).get(h, 0)
        return z[..., h * dh : (h + 1) * dh] @ _o_rows(o_proj, h, dh) + added

    def put(x, new, z):
        change = new - get(x, z)
        if id(z) not in _HEAD_OUT_WRITES:  # forget the entry when this forward's z is freed
            weakref.finalize(z, _HEAD_OUT_WRITES.pop, id(z), None)
        added = _HEAD_OUT_WRITES.setdefault(id(z), {})
        added[h] = added.get(h, 0) + change
        return x + change

    return Site(o_path, "post", get, put)


def _attn_module(model: nn.Module, layer: int) -> nn.Module:
    site = sites(model, layer)["pattern"]
    if site.io == "attn":
        return model.get_submodule(site.path)
    return model.get_submodule(site.path.rpartition(".")[0])  # GPT-J: attn.attn_dropout


def _dims(model: nn.Module, layer: int) -> tuple[int, int, int]:
    """(query heads, key-value heads, head dim), read from the attention module."""
    cfg = model.config
    attn = _attn_module(model, layer)
    dh = next(getattr(attn, a) for a in ("head_dim", "head_size", "attention_head_size")
              if hasattr(attn, a))  # fmt: skip
    n = cfg.num_attention_heads
    return n, getattr(cfg, "num_key_value_heads", None) or n, dh


def sites_llama_like(model: nn.Module, layer: int) -> dict[str, Site]:
    """Sites of a Llama-like model (pre-norm, separate q/k/v projections, gated MLP)."""
    post = lambda p: Site(p, "post")  # noqa: E731
    pre = lambda p: Site(p, "pre")  # noqa: E731
    b, c = f"model.layers.{layer}", model.config
    n, kv = c.num_attention_heads, c.num_key_value_heads
    dh = getattr(c, "head_dim", None) or c.hidden_size // n
    return {
        "embed": post("model.embed_tokens"), "resid_pre": pre(b),
        "q": Site(f"{b}.self_attn.q_proj", "post", *_heads(n, dh)),
        "k": Site(f"{b}.self_attn.k_proj", "post", *_heads(kv, dh)),
        "v": Site(f"{b}.self_attn.v_proj", "post", *_heads(kv, dh)),
        "pattern": Site(f"{b}.self_attn", "attn"),
        "z": Site(f"{b}.self_attn.o_proj", "pre", *_heads(n, dh)),
        "attn_out": post(f"{b}.self_attn"), "resid_mid": pre(f"{b}.post_attention_layernorm"),
        "hidden": pre(f"{b}.mlp.down_proj"), "mlp_out": post(f"{b}.mlp"),
        "resid_post": post(b), "final": post("model.norm"), "logits": post("lm_head"),
    }  # fmt: skip


def sites(model: nn.Module, layer: int = 0) -> dict[str, Site]:
    """This model's sites at ``layer`` (and the top-level ones)."""
    kind = model.config.model_type
    post = lambda p: Site(p, "post")  # noqa: E731
    pre = lambda p: Site(p, "pre")  # noqa: E731
    if kind == "gpt2":
        b = f"transformer.h.{layer}"
        n, dh = model.config.n_head, model.config.n_embd // model.config.n_head
        return {
            "embed": post("transformer.drop"), "resid_pre": pre(b),
            **{x: Site(f"{b}.attn.c_attn", "post", *_heads(n, dh, j)) for j, x in enumerate("qkv")},
            "pattern": Site(f"{b}.attn", "attn"),
            "z": Site(f"{b}.attn.c_proj", "pre", *_heads(n, dh)),
            "attn_out": post(f"{b}.attn"), "resid_mid": pre(f"{b}.ln_2"),
            "hidden": post(f"{b}.mlp.act"), "mlp_out": post(f"{b}.mlp"),
            "resid_post": post(b), "final": post("transformer.ln_f"), "logits": post("lm_head"),
        }  # fmt: skip
    if kind == "gpt_neox":
        b = f"gpt_neox.layers.{layer}"
        n = model.config.num_attention_heads
        dh = model.config.hidden_size // n
        return {
            "embed": post("gpt_neox.emb_dropout"), "resid_pre": pre(b),
            **{x: Site(f"{b}.attention.query_key_value", "post", *_neox_qkv(n, dh, j))
               for j, x in enumerate("qkv")},
            "pattern": Site(f"{b}.attention", "attn"),
            "z": Site(f"{b}.attention.dense", "pre", *_heads(n, dh)),
            "attn_out": post(f"{b}.attention"), "hidden": post(f"{b}.mlp.act"),
            "mlp_out": post(f"{b}.mlp"), "resid_post": post(b),
            "final": post("gpt_neox.final_layer_norm"), "logits": post("lm_head"),
        }  # fmt: skip
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        return sites_llama_like(model, layer)
    if kind in ("gemma2", "gemma3_text"):  # norms before and after attention and MLP
        b = f"model.layers.{layer}"
        llama = sites_llama_like(model, layer)
        return {**llama, "resid_mid": pre(f"{b}.pre_feedforward_layernorm"),
                "mid_add": post(f"{b}.post_attention_layernorm")}  # fmt: skip
    if kind == "olmo2":  # norms after attention and MLP only: resid_mid is the MLP's input
        b = f"model.layers.{layer}"
        return {**sites_llama_like(model, layer), "resid_mid": pre(f"{b}.mlp"),
                "mid_add": post(f"{b}.post_attention_layernorm")}  # fmt: skip
    if kind == "gptj":  # parallel attention + MLP; probabilities through attn_dropout
        b = f"transformer.h.{layer}"
        n, dh = model.config.n_head, model.config.n_embd // model.config.n_head
        return {
            "embed": post("transformer.drop"), "resid_pre": pre(b),
            **{x: Site(f"{b}.attn.{x}_proj", "post", *_heads(n, dh)) for x in "qkv"},
            "pattern": post(f"{b}.attn.attn_dropout"),
            "z": Site(f"{b}.attn.out_proj", "pre", *_heads(n, dh)),
            "attn_out": post(f"{b}.attn"), "hidden": post(f"{b}.mlp.act"),
            "mlp_out": post(f"{b}.mlp"), "resid_post": post(b),
            "final": post("transformer.ln_f"), "logits": post("lm_head"),
        }  # fmt: skip
    if kind == "bert":
        b, c = f"encoder.layer.{layer}", model.config
        n = c.num_attention_heads
        dh = c.hidden_size // n
        a = f"{b}.attention"
        return {
            "embed": post("embeddings"), "resid_pre": pre(b),
            **{x: Site(f"{a}.self.{m}", "post", *_heads(n, dh))
               for x, m in zip("qkv", ("query", "key", "value"), strict=True)},
            "pattern": Site(f"{a}.self", "attn"),
            "z": Site(f"{a}.output.dense", "pre", *_heads(n, dh)),
            "attn_out": post(f"{a}.output.dense"), "resid_mid": post(a),
            "hidden": post(f"{b}.intermediate"), "mlp_out": post(f"{b}.output.dense"),
            "resid_post": post(b),
        }  # fmt: skip
    raise NotImplementedError(kind)


def S(model: nn.Module, name: str, layer: int = 0, h: int | None = None) -> Site:  # noqa: N802
    """A site by short name; with ``h``, that head's slice (``out`` for head outputs)."""
    if name == "out":
        return head_out(model, layer, h)
    site = sites(model, layer)[name]
    if h is None:
        return site
    return head(site, h, 1 if name == "pattern" else 2)


# -- hook specs ---------------------------------------------------------------------------
Spec = tuple[Site, Callable[[Tensor], Tensor | None]]


def grab(store: dict, key: str) -> Callable[[Tensor], None]:
    """A hook function that records the site's value under ``key``."""

    def fn(v):
        store[key] = v.detach().clone()

    return fn


def put_at(index, value) -> Callable[[Tensor], Tensor]:
    """A hook function that sets ``site[index] = value`` (value: tensor or callable of the
    site's current value)."""

    def fn(v):
        y = v.clone()
        y[index] = value(v) if callable(value) else value
        return y

    return fn


def _apply(site: Site, fn, x: Tensor, inp: Any) -> Tensor | None:
    new = fn(site.get(x, inp))
    return None if new is None else site.put(x, new, inp)


def _first_input(args: tuple, kwargs: dict) -> Tensor | None:
    return args[0] if args else kwargs.get("hidden_states")


def _pre_hook(site, fn):
    def hook(mod, args, kwargs):
        new = _apply(site, fn, _first_input(args, kwargs), None)
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return hook


def _post_hook(site, fn):
    def hook(mod, args, kwargs, out):
        x = out if isinstance(out, Tensor) else out[0]
        new = _apply(site, fn, x, _first_input(args, kwargs))
        if new is None or isinstance(out, Tensor):
            return new
        return (new, *out[1:])

    return hook


# -- attention with its probabilities exposed ---------------------------------------------
_ATTN_NAME = "conformance_reference"
_PROB_HOOKS: dict[int, list[Spec]] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):  # fmt: skip
    """softmax(q k^T * scale + causal mask) @ v, with hooks on the probabilities.

    The mask is built here (inputs carry no padding), so nothing depends on HF's masks.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:  # Gemma 2: cap * tanh(scores / cap)
        scores = torch.tanh(scores / softcap) * softcap
    if getattr(module, "is_causal", False):
        p, s = scores.shape[-2:]
        future = torch.ones(p, s, dtype=torch.bool, device=scores.device).triu(1 + s - p)
        window = getattr(module, "sliding_window", None)
        if window:  # a query sees the last `window` keys, itself included
            future |= torch.ones_like(future).tril(s - p - window)
        scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(-1)
    for site, fn in _PROB_HOOKS.get(id(module), ()):
        new = _apply(site, fn, probs, None)
        probs = probs if new is None else new
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


@contextlib.contextmanager
def _reference_attention_on(model: nn.Module, specs: list[Spec]):
    if not specs:
        yield
        return
    transformers.AttentionInterface.register(_ATTN_NAME, _reference_attention)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    for site, fn in specs:
        _PROB_HOOKS.setdefault(id(model.get_submodule(site.path)), []).append((site, fn))
    try:
        for c in configs.values():
            c._attn_implementation = _ATTN_NAME
        yield
    finally:
        _PROB_HOOKS.clear()
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def run(model: nn.Module, ids: Tensor, *specs: Spec) -> Any:
    """Forward ``ids`` with the hooks ``(site, fn)`` (in order); returns the model output."""
    handles = []
    try:
        for site, fn in specs:
            mod = model.get_submodule(site.path)
            if site.io == "pre":
                handles.append(mod.register_forward_pre_hook(_pre_hook(site, fn), with_kwargs=True))
            elif site.io == "post":
                handles.append(mod.register_forward_hook(_post_hook(site, fn), with_kwargs=True))
        attn = [(s, f) for s, f in specs if s.io == "attn"]
        kwargs = {"use_cache": False} if hasattr(model, "lm_head") else {}
        with torch.no_grad(), _reference_attention_on(model, attn):
            return model(input_ids=ids, **kwargs)
    finally:
        for h in handles:
            h.remove()


def acts(model: nn.Module, ids: Tensor, *specs: Spec, **named: Site) -> dict[str, Tensor]:
    """Values of the ``named`` sites in a run of ``ids`` (after the hooks ``specs``)."""
    out: dict[str, Tensor] = {}
    run(model, ids, *specs, *((site, grab(out, k)) for k, site in named.items()))
    return out


def patched(model, base, *specs: Spec, add_logits: bool = True, **named: Site) -> dict[str, Tensor]:
    """Run ``base`` with the write hooks ``specs``, saving ``named`` sites (+ logits)."""
    out: dict[str, Tensor] = {}
    if add_logits:
        named = {**named, "logits": S(model, "logits")}
    output = run(model, base, *specs, *((site, grab(out, k)) for k, site in named.items()))
    key = "logits" if hasattr(output, "logits") else "last_hidden_state"
    out[f"output.{key}"] = getattr(output, key)
    return out


def interchange(model, base, source, site: Site, index, **named: Site) -> dict[str, Tensor]:
    """``base.site[index] = source.site[index]``; saves ``named`` sites and the logits."""
    src = acts(model, source, v=site)["v"]
    return patched(model, base, (site, put_at(index, src[index])), **named)


def gpt2_pattern(model, layer: int, qkv_out: Tensor) -> Tensor:
    """Attention probabilities computed by hand from GPT-2's c_attn output (no rotary)."""
    n = model.config.n_head
    dh = qkv_out.shape[-1] // 3 // n
    q, k, _ = (t.unflatten(-1, (n, dh)).transpose(1, 2) for t in qkv_out.split(n * dh, -1))
    scores = q @ k.transpose(-1, -2) / dh**0.5
    p = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(p, p, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def _raw(model, layer: int, name: str) -> Site:
    """The whole hooked tensor of a site's module (no view)."""
    return Site(sites(model, layer)[name].path, sites(model, layer)[name].io)


# -- references: interchange at every site kind --------------------------------------------
def _one(name: str, layer: int, index, **saves: tuple[str, int]):
    """Reference for a single-site interchange; ``saves``: save name -> (site, layer)."""

    def fn(m, base, sources):
        named = {k: S(m, s, lay) for k, (s, lay) in saves.items()}
        return interchange(m, base, sources[0], S(m, name, layer), index, **named)

    return fn


REFS.update({
    "01_interchange_embed": _one("embed", 0, ix[:, 1], embed=("embed", 0)),
    "02_interchange_resid_pre": _one(
        "resid_pre", 1, ix[:, 2], resid_pre=("resid_pre", 1), resid_post2=("resid_post", 2)),
    "03_interchange_attn_q": _one("q", 1, ix[:, 3], q=("q", 1), attn_out=("attn_out", 1)),
    "04_interchange_attn_k": _one("k", 0, ix[:, :3], k=("k", 0), z=("z", 0)),
    "05_interchange_attn_v": _one("v", 2, ix[...], v=("v", 2), z=("z", 2)),
    "06_interchange_attn_z": _one("z", 1, ix[:, -1], z=("z", 1), attn_out=("attn_out", 1)),
    "08_interchange_attn_out": _one(
        "attn_out", 0, ix[:, 2:4], attn_out=("attn_out", 0), resid_post=("resid_post", 0)),
    "10_interchange_mlp_hidden": _one(
        "hidden", 2, ix[:, -2], hidden=("hidden", 2), mlp_out=("mlp_out", 2)),
    "11_interchange_mlp_out": _one("mlp_out", 1, ix[:, 4], mlp_out=("mlp_out", 1)),
    "12_interchange_resid_post": _one(
        "resid_post", 0, ix[:, 0:2], resid_post=("resid_post", 0), resid_pre1=("resid_pre", 1)),
    "13_interchange_final": _one("final", 0, ix[:, -1], final=("final", 0)),
    "14_interchange_logits": _one("logits", 0, ix[:, -1]),
    "39_qwen2_mlp_hidden": _one("hidden", 0, ix[:, 2:], hidden=("hidden", 0),
                                mlp_out=("mlp_out", 0)),
})  # fmt: skip


@ref("07_write_attn_pattern")
def _(m, base, sources):
    raw = _raw(m, 1, "q")  # the fused c_attn output
    src_p = gpt2_pattern(m, 1, acts(m, sources[0], x=raw)["x"])
    base_p = gpt2_pattern(m, 1, acts(m, base, x=raw)["x"])
    out = patched(m, base, (S(m, "pattern", 1), lambda p: src_p), z=S(m, "z", 1))
    return {**out, "pattern_before": base_p, "src_pattern": src_p, "pattern_after": src_p}


def resid_mid_write(m, layer: int, fn) -> list[Spec]:
    """Write resid_mid = resid_pre + attn_out by changing the attention output (or, where
    the block norms it before the residual add, the output of that norm: ``mid_add``)."""
    pre: dict[str, Tensor] = {}
    added = sites(m, layer).get("mid_add", S(m, "attn_out", layer))

    def on_attn(a):
        new = fn(pre["x"] + a)
        return None if new is None else new - pre["x"]

    return [(S(m, "resid_pre", layer), grab(pre, "x")), (added, on_attn)]


def _resid_mid_ref(m, base, sources, layer, index, **saves):
    src = acts(m, sources[0], v=S(m, "resid_mid", layer))["v"]
    named = {k: S(m, s, layer) for k, s in saves.items()}
    return patched(m, base, *resid_mid_write(m, layer, put_at(index, src[index])), **named)


@ref("09_interchange_resid_mid")
def _(m, base, sources):
    return _resid_mid_ref(m, base, sources, 1, ix[:, 1], resid_mid="resid_mid", mlp_out="mlp_out")


@ref("33_llama_resid_mid")
def _(m, base, sources):
    return _resid_mid_ref(m, base, sources, 1, ix[:, 2], resid_mid="resid_mid", hidden="hidden")


# -- heads -------------------------------------------------------------------------------
@ref("15_head_qkv")
def _(m, base, sources):
    q1, k2, v3 = S(m, "q", 1, 1), S(m, "k", 1, 2), S(m, "v", 1, 3)
    src = acts(m, sources[0], q1=q1, k2=k2, v3=v3)
    writes = [(q1, put_at(ix[...], src["q1"])), (k2, put_at(ix[:, :4], src["k2"][:, :4])),
              (v3, put_at(ix[...], src["v3"]))]  # fmt: skip
    return patched(m, base, *writes, q1=q1, k2=k2, v3=v3, z=S(m, "z", 1))


@ref("16_head_z_pattern_out")
def _(m, base, sources):
    z0, p2, o1 = S(m, "z", 0, 0), S(m, "pattern", 1, 2), S(m, "out", 2, 1)
    src = acts(m, sources[0], z0=z0, out1=o1)
    src_p2 = gpt2_pattern(m, 1, acts(m, sources[0], x=_raw(m, 1, "q"))["x"])[:, 2]
    out: dict[str, Tensor] = {}
    writes = [
        (z0, put_at(ix[:, 2], src["z0"][:, 2])),
        (z0, grab(out, "z0")),
        (p2, grab(out, "pattern2_before")),
        (p2, lambda p: src_p2),
        (p2, grab(out, "pattern2_after")),
        (o1, grab(out, "out1_before")),
        (o1, lambda o: src["out1"]),
        (o1, grab(out, "out1_after")),
    ]
    res = patched(m, base, *writes, z2=S(m, "z", 1, 2), attn_out=S(m, "attn_out", 2))
    return {**res, **out}


@ref("31_head_z_ablation")
def _(m, base, sources):
    zero = [(S(m, "z", 2, h), lambda z: torch.zeros_like(z)) for h in (0, 3)]
    return patched(m, base, *zero, z=S(m, "z", 2), attn_out=S(m, "attn_out", 2))


@ref("34_llama_gqa_k")
def _(m, base, sources):
    k1, k2h = S(m, "k", 1), S(m, "k", 2, 1)
    src = acts(m, sources[0], k1=k1, k2=k2h)
    writes = [(k1, put_at(ix[:, :, 1], src["k1"][:, :, 1])),
              (k2h, put_at(ix[:, -1], src["k2"][:, -1]))]  # fmt: skip
    return patched(m, base, *writes, k1=k1, k2_head1=k2h, z1=S(m, "z", 1))


@ref("35_neox_qkv_interleaved")
def _(m, base, sources):
    q, v = S(m, "q", 1), S(m, "v", 1)
    src = acts(m, sources[0], q=q, v=v)
    writes = [(q, put_at(ix[:, -1], src["q"][:, -1])), (v, put_at(ix[:, :, 2], src["v"][:, :, 2]))]
    return patched(m, base, *writes, q=q, v=v, head2_out=S(m, "out", 1, 2),
                   attn_out=S(m, "attn_out", 1))  # fmt: skip


@ref("37_llama_pattern_write")
def _(m, base, sources):
    p = S(m, "pattern", 0)
    src = acts(m, sources[0], p=p)["p"]
    base_p = acts(m, base, p=p)["p"]
    out = patched(m, base, (p, lambda x: (x + src) / 2), z=S(m, "z", 0))
    return {**out, "pattern_base": base_p, "pattern_src": src}


@ref("38_mistral_head_dim_z")
def _(m, base, sources):
    z3 = S(m, "z", 1, 3)
    src = acts(m, sources[0], z3=z3)["z3"]
    return patched(m, base, (z3, lambda z: src), z=S(m, "z", 1), head3_out=S(m, "out", 1, 3))


# -- minilm --------------------------------------------------------------------------------
@ref("36_minilm_interchange")
def _(m, base, sources):
    site = S(m, "resid_post", 2)
    src = acts(m, sources[0], v=site)["v"]
    out = patched(
        m,
        base,
        (site, put_at(ix[:, 1], src[:, 1])),
        add_logits=False,
        z_head4=S(m, "z", 3, 4),
        hidden=S(m, "hidden", 3),
        last=S(m, "resid_post", 5),
    )
    out["hidden"] = out["hidden"][:, 1]
    return out


@ref("40_minilm_heads")
def _(m, base, sources):
    v3 = S(m, "v", 1, 3)
    src = acts(m, sources[0], v=v3)["v"]
    return patched(
        m,
        base,
        (v3, lambda v: src),
        add_logits=False,
        pattern=S(m, "pattern", 1),
        attn_out=S(m, "attn_out", 1),
        resid_mid=S(m, "resid_mid", 1),
    )


# -- positions, steering, operators ----------------------------------------------------------
@ref("17_per_example_positions")
def _(m, base, sources, pos):
    rows = torch.arange(base.shape[0])
    site = S(m, "resid_post", 1)
    src = acts(m, sources[0], v=site)["v"]
    out = patched(m, base, (site, put_at(ix[rows, pos], src[rows, pos])), patched=site)
    out["patched"] = out["patched"][rows, pos]
    return {**out, "logits_at_pos": out["logits"][rows, pos]}


@ref("18_steering_add")
def _(m, base, sources):
    vec = torch.randn(32, generator=torch.Generator().manual_seed(18))
    site = S(m, "resid_post", 2)
    return patched(m, base, (site, put_at(ix[:, -1], lambda v: v[:, -1] + vec)),
                   resid_post=site, final=S(m, "final"))  # fmt: skip


@ref("49_inplace_on_alias")
def _(m, base, sources):
    m0, r1, m2 = S(m, "mlp_out", 0), S(m, "resid_post", 1), S(m, "mlp_out", 2)
    src = acts(m, sources[0], r=r1)["r"]
    writes = [
        (m0, lambda v: v + 100.0),
        (r1, put_at(ix[:, 2], lambda v: v[:, 2] - src[:, 2])),
        (m2, put_at(ix[1, -1], lambda v: v[1, -1] * 3.0)),
    ]
    out = patched(m, base, *writes, mlp_out0=m0, resid_post1=r1, mlp_out2=m2)
    x, y, w = out["mlp_out0"], out["resid_post1"][:, 2], out["mlp_out2"][1, -1]
    return {**out, "x": x, "y": y, "w": w}


@ref("19_inplace_ops")
def _(m, base, sources):
    a1 = S(m, "attn_out", 1)
    src = acts(m, sources[0], a=a1)["a"]
    writes = [
        (S(m, "mlp_out", 0), lambda v: v + 0.5),
        (a1, put_at(ix[:, 1], lambda v: v[:, 1] - src[:, 1])),
        (S(m, "resid_post", 1), lambda v: v * 1.5),
        (S(m, "mlp_out", 2), put_at(ix[:, -1], lambda v: v[:, -1] / 4.0)),
    ]
    return patched(m, base, *writes, mlp_out0=S(m, "mlp_out", 0), attn_out1=a1,
                   resid_post1=S(m, "resid_post", 1), mlp_out2=S(m, "mlp_out", 2))  # fmt: skip


@ref("20_two_sources")
def _(m, base, sources):
    rp, mo = S(m, "resid_pre", 1), S(m, "mlp_out", 2)
    s1, s2 = (acts(m, s, rp=rp, mo=mo) for s in sources)
    writes = [(rp, put_at(ix[:, 1], s1["rp"][:, 1])), (rp, put_at(ix[:, 2], s2["rp"][:, 2])),
              (mo, lambda v: (s1["mo"] + s2["mo"]) / 2)]  # fmt: skip
    return patched(m, base, *writes, resid_pre1=rp, mlp_out2=mo)


@ref("21_write_into_source")
def _(m, base, sources):
    rp = S(m, "resid_post", 2)
    zero = (S(m, "mlp_out", 0), put_at(ix[:, 1], 0.0))
    src = acts(m, sources[0], zero, v=rp)["v"]
    out = patched(m, base, (rp, put_at(ix[:, 1], src[:, 1])), resid_post=rp)
    return {**out, "src_resid_post": src}


@ref("22_base_from_later_source_layer")
def _(m, base, sources):
    src = acts(m, sources[0], v=S(m, "resid_post", 2))["v"]
    r0 = S(m, "resid_post", 0)
    return patched(m, base, (r0, put_at(ix[:, 2], src[:, 2])), resid_post0=r0)


@ref("23_save_before_after_write")
def _(m, base, sources):
    site = S(m, "mlp_out", 1)
    src = acts(m, sources[0], v=site)["v"]
    out: dict[str, Tensor] = {}
    res = patched(m, base, (site, grab(out, "before")), (site, put_at(ix[:, 0], src[:, 0])),
                  after=site)  # fmt: skip
    return {**res, **out}


@ref("24_placeholders")
def _(m, base, sources, alpha, vec):
    site = S(m, "mlp_out", 1)
    return patched(m, base, (site, put_at(ix[:, -1], lambda v: v[:, -1] + alpha * vec)),
                   mlp_out=site)  # fmt: skip


# -- module calls, functions, ablations -----------------------------------------------------
@ref("25_module_call_linear")
def _(m, base, sources):
    g = torch.Generator().manual_seed(25)
    w = torch.randn(32, 32, generator=g) * 0.2
    b = torch.randn(32, generator=g) * 0.1
    site = S(m, "resid_post", 1)
    mapped = acts(m, sources[0], v=site)["v"][:, -1] @ w.T + b
    out = patched(m, base, (site, put_at(ix[:, -1], mapped)))
    return {**out, "mapped": mapped}


@ref("26_custom_module")
def _(m, base, sources):
    site = S(m, "mlp_out", 1)
    src = acts(m, sources[0], v=site)["v"]
    even = torch.arange(32) % 2 == 0
    return patched(m, base, (site, lambda v: torch.where(even, src, v)), mlp_out=site)


@ref("27_chained_writes")
def _(m, base, sources):
    m0, r0, rp1, m1 = (S(m, "mlp_out", 0), S(m, "resid_post", 0), S(m, "resid_pre", 1),
                       S(m, "mlp_out", 1))  # fmt: skip
    src = acts(m, sources[0], m0=m0, m1=m1)
    seen: dict[str, Tensor] = {}
    writes = [
        (m0, put_at(ix[:, 1], src["m0"][:, 1])),
        (r0, grab(seen, "r0")),
        (rp1, put_at(ix[:, 3], lambda v: v[:, 3] + seen["r0"][:, 1])),
        (m1, put_at(ix[:, 0], src["m1"][:, 0])),
        (m1, put_at(ix[:, 2], lambda v: v[:, 0] * 2)),
    ]
    return patched(m, base, *writes, resid_pre1=rp1, mlp_out1=m1)


@ref("28_torch_functions")
def _(m, base, sources):
    r1, a2 = S(m, "resid_post", 1), S(m, "attn_out", 2)
    src = acts(m, sources[0], r1=r1, a2=a2)
    keep: dict[str, Tensor] = {}

    def choose(v):
        keep["keep"] = src["r1"].norm(dim=-1, keepdim=True) > v.norm(dim=-1, keepdim=True)
        return torch.where(keep["keep"], src["r1"], v)

    writes = [(r1, choose), (a2, put_at(ix[:, :3], src["a2"][:, :3]))]
    out = patched(m, base, *writes)
    logits = out.pop("logits")
    return {**out, **keep, "probs": logits[:, -1].softmax(-1), "logprobs": logits.log_softmax(-1)}


@ref("29_zero_ablation")
def _(m, base, sources):
    a0, m1 = S(m, "attn_out", 0), S(m, "mlp_out", 1)
    writes = [(a0, put_at(ix[:, 2:], 0.0)), (m1, torch.zeros_like)]
    return patched(m, base, *writes, attn_out0=a0, mlp_out1=m1)


@ref("30_mean_ablation")
def _(m, base, sources):
    site = S(m, "attn_out", 1)
    mean = acts(m, sources[0], v=site)["v"].mean(dim=(0, 1))
    out = patched(m, base, (site, lambda v: mean.expand_as(v)), attn_out=site)
    return {**out, "mean": mean}


@ref("32_module_site")
def _(m, base, sources):
    mlp = Site("transformer.h.1.mlp", "post")
    mlp_in = Site("transformer.h.1.mlp", "pre")
    ln1_in = Site("transformer.h.2.ln_1", "pre")
    src = acts(m, sources[0], v=mlp)["v"]
    writes = [(mlp, put_at(ix[:, 2], src[:, 2])), (ln1_in, put_at(ix[:, 0], lambda v: v[:, 0] * 2))]
    return patched(m, base, *writes, mlp_in=mlp_in, mlp_out=mlp,
                   block2=Site("transformer.h.2", "post"))  # fmt: skip


@ref("41_base_and_source_feed_each_other")
def _(m, base, sources):
    rp, mo = S(m, "resid_pre", 1), S(m, "mlp_out", 2)
    clean = acts(m, base, rp=rp)["rp"]
    out: dict[str, Tensor] = {}
    src_run = run(m, sources[0], (rp, put_at(ix[:, 0], clean[:, 0])), (mo, grab(out, "src_mo")))
    res = patched(m, base, (mo, lambda v: out["src_mo"]), mlp_out=mo)
    return {**res, "src_logits": src_run.logits}


@ref("42_source_chain")
def _(m, base, sources):
    r0, r1, r2 = (S(m, "resid_post", i) for i in range(3))
    s2 = acts(m, sources[1], v=r2)["v"]
    s1 = acts(m, sources[0], (r0, put_at(ix[:, 1], s2[:, 1])), v=r2)["v"]
    res = patched(m, base, (r1, put_at(ix[:, 1], s1[:, 1])))
    return {**res, "s1_resid_post": s1}


@ref("43_placeholder_slice_and_scale")
def _(m, base, sources, k, scale):
    a0, m1 = S(m, "attn_out", 0), S(m, "mlp_out", 1)
    writes = [(a0, put_at(ix[:, k:], 0.0)), (m1, lambda v: v * scale)]
    return patched(m, base, *writes, attn_out0=a0, mlp_out1=m1)


# -- every site kind on one architecture --------------------------------------------------
def every_site(m, base, source, writes, **saves: Site) -> dict[str, Tensor]:
    """Each ``(save name, site, layer, head, index)`` takes ``source.site[index]`` and is
    saved right after its write (resid_mid of a pre-norm block is written through the
    attention output and read back at the next norm's input)."""
    resolved = [(n, S(m, s, lay, h), idx) for n, s, lay, h, idx in writes]
    src = acts(m, source, **{n: site for n, site, _ in resolved})
    out: dict[str, Tensor] = {}
    specs = []
    for (name, kind, layer, _, index), (_, site, _) in zip(writes, resolved, strict=True):
        write = put_at(index, src[name][index])
        if kind == "resid_mid" and site.io == "pre":
            specs += resid_mid_write(m, layer, write)
        else:
            specs.append((site, write))
        specs.append((site, grab(out, name)))
    return {**patched(m, base, *specs, add_logits=False, **saves), **out}


#: (save name, site, layer, head, index) in forward order, as in the programs
_EVERY_DECODER = [
    ("embed", "embed", 0, None, ix[:, 0]),
    ("resid_pre0", "resid_pre", 0, None, ix[:, 1]),
    ("q0", "q", 0, None, ix[:, 2]),
    ("k0", "k", 0, None, ix[:, 3]),
    ("v0", "v", 0, None, ix[:, :, 1]),
    ("pattern0", "pattern", 0, None, ix[:, :, 4]),
    ("z0", "z", 0, None, ix[:, 5]),
]


@ref("44_llama_every_site")
def _(m, base, sources):
    writes = _EVERY_DECODER + [
        ("q1_head2", "q", 1, 2, ix[:, 1]),
        ("v1_head0", "v", 1, 0, ix[:, 2:]),
        ("attn_out1", "attn_out", 1, None, ix[:, 1]),
        ("resid_mid1", "resid_mid", 1, None, ix[:, 2]),
        ("hidden1", "hidden", 1, None, ix[:, 3]),
        ("mlp_out1", "mlp_out", 1, None, ix[:, 4]),
        ("resid_post1", "resid_post", 1, None, ix[:, 5]),
        ("pattern2_head3", "pattern", 2, 3, ix[:, 4]),
        ("z2_head2", "z", 2, 2, ix[:, 3]),
        ("out2_head1", "out", 2, 1, ix[:, 2]),
        ("final", "final", 0, None, ix[:, 0]),
    ]
    return every_site(m, base, sources[0], writes, logits=S(m, "logits"))


@ref("45_neox_every_site")
def _(m, base, sources):
    writes = _EVERY_DECODER + [
        ("k1_head3", "k", 1, 3, ix[:, 1]),
        ("attn_out1", "attn_out", 1, None, ix[:, 1]),
        ("hidden1", "hidden", 1, None, ix[:, 3]),
        ("mlp_out1", "mlp_out", 1, None, ix[:, 4]),
        ("resid_post1", "resid_post", 1, None, ix[:, 5]),
        ("pattern2_head0", "pattern", 2, 0, ix[:, 4]),
        ("out2_head2", "out", 2, 2, ix[:, 2]),
        ("final", "final", 0, None, ix[:, 0]),
    ]
    return every_site(m, base, sources[0], writes, logits=S(m, "logits"))


@ref("46_minilm_every_site")
def _(m, base, sources):
    writes = [
        ("embed", "embed", 0, None, ix[:, 1]),
        ("resid_pre0", "resid_pre", 0, None, ix[:, 2]),
        ("q0", "q", 0, None, ix[:, 3]),
        ("k0", "k", 0, None, ix[:, 4]),
        ("v0", "v", 0, None, ix[:, :, 5]),
        ("pattern0", "pattern", 0, None, ix[:, :, 6]),
        ("z0", "z", 0, None, ix[:, 1]),
        ("q1_head7", "q", 1, 7, ix[:, 2]),
        ("attn_out1", "attn_out", 1, None, ix[:, 3]),
        ("resid_mid1", "resid_mid", 1, None, ix[:, 4]),
        ("hidden1", "hidden", 1, None, ix[:, 5]),
        ("mlp_out1", "mlp_out", 1, None, ix[:, 6]),
        ("resid_post1", "resid_post", 1, None, ix[:, 1]),
        ("pattern2_head5", "pattern", 2, 5, ix[:, 2]),
        ("out2_head11", "out", 2, 11, ix[:, 3]),
    ]
    return every_site(m, base, sources[0], writes, last=S(m, "resid_post", 5))


@ref("47_mistral_read_every_site")
def _(m, base, sources):
    names = ("resid_pre", "resid_mid", "resid_post", "q", "k", "v", "pattern", "z", "hidden")
    saves = {n: S(m, n, 1) for n in names}
    saves |= {f"{n}_head3": S(m, n, 1, 3) for n in ("q", "pattern", "z", "out")}
    saves |= {f"{n}_head1": S(m, n, 1, 1) for n in ("k", "v")}
    return patched(m, base, embed=S(m, "embed"), attn_out=S(m, "attn_out", 1),
                   mlp_out=S(m, "mlp_out", 1), final=S(m, "final"), **saves)  # fmt: skip


@ref("48_subspace_and_indexing")
def _(m, base, sources):
    u = torch.randn(32, generator=torch.Generator().manual_seed(48))
    u = u / u.norm()
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    r1, rp2, m0 = S(m, "resid_post", 1), S(m, "resid_pre", 2), S(m, "mlp_out", 0)
    src = acts(m, sources[0], r1=r1, m0=m0)
    writes = [
        (m0, lambda v: torch.where(mask[..., None], src["m0"], v)),
        (r1, lambda v: torch.cat([src["r1"][..., :16], v[..., 16:]], -1)),
        (rp2, lambda v: v - torch.einsum("bpd,d->bp", v, u)[..., None] * u),
    ]
    out = patched(m, base, *writes, resid_post1=r1, resid_pre2=rp2, mlp_out0=m0,
                  z_last_head=S(m, "z", 2, 3), q=S(m, "q", 2), k=S(m, "k", 2))  # fmt: skip
    out["qk"] = (out.pop("q") * out.pop("k")).sum(-1)
    return out
