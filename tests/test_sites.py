"""The site vocabulary (DESIGN section 2) on every mapped architecture, torch backend.

Every expected value here is computed independently of tracevene: plain forward
hooks / pre-hooks on the Hugging Face modules, ``output_attentions=True`` for
attention probabilities, and hand-written reshapes that follow the Hugging Face
source of each architecture. tracevene's own site tables (``tracevene/sites``)
are never consulted for the expectations.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor, nn

import tracevene as iv
from tests import models as M
from tests import numerics

ARCHS = [*M.DECODERS, "minilm"]
PRE_LN = ["gpt2", "llama", "qwen2", "mistral", "qwen3"]  # resid_mid = resid_pre + attn.out


# -- independent per-architecture facts (from the Hugging Face sources) -------------
@dataclass(frozen=True)
class Ref:
    """Where things live in one HF architecture, written from its modeling code.

    Paths under a layer are relative to the layer module.
    """

    layers: str
    attn: str  # the module whose forward computes attention probabilities
    q: str
    k: str
    v: str
    fused: str | None  # None, "split" (GPT-2 c_attn) or "interleaved" (NeoX)
    o_proj: str
    attn_out: str  # module whose output is the attention block's output
    mid: tuple[str, str] | None  # (path, io) holding resid_mid; None: no such residual
    hidden_parts: tuple[tuple[str, str], ...]  # product of these = mlp.hidden
    hidden_write: tuple[str, str]
    mlp_out: str
    final: str | None
    lm_head: str | None
    mid_add: str | None = None  # module whose output is added to resid_pre (None: attn_out)
    probs: str | None = None  # module whose output is the attention probabilities (None:
    # they come from HF's eager_attention_forward, which the pattern writes replace)


_LLAMA = Ref(
    "model.layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    None, "self_attn.o_proj", "self_attn", ("post_attention_layernorm", "input"),
    (("mlp.act_fn", "output"), ("mlp.up_proj", "output")), ("mlp.down_proj", "input"),
    "mlp", "model.norm", "lm_head",
)  # fmt: skip

# Gemma 2 / 3: the attention output is normed before the residual add; the residual
# between attention and MLP is the input of pre_feedforward_layernorm.
_GEMMA2 = Ref(
    "model.layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    None, "self_attn.o_proj", "self_attn", ("pre_feedforward_layernorm", "input"),
    (("mlp.act_fn", "output"), ("mlp.up_proj", "output")), ("mlp.down_proj", "input"),
    "mlp", "model.norm", "lm_head", mid_add="post_attention_layernorm",
)  # fmt: skip

# OLMo 2: norms after attention and MLP only; the residual between them is the MLP's input.
_OLMO2 = Ref(
    "model.layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    None, "self_attn.o_proj", "self_attn", ("mlp", "input"),
    (("mlp.act_fn", "output"), ("mlp.up_proj", "output")), ("mlp.down_proj", "input"),
    "mlp", "model.norm", "lm_head", mid_add="post_attention_layernorm",
)  # fmt: skip

REFS = {
    "gpt2": Ref(
        "transformer.h", "attn", "attn.c_attn", "attn.c_attn", "attn.c_attn", "split",
        "attn.c_proj", "attn", ("ln_2", "input"), (("mlp.act", "output"),),
        ("mlp.act", "output"), "mlp", "transformer.ln_f", "lm_head",
    ),
    "neox": Ref(
        "gpt_neox.layers", "attention", *["attention.query_key_value"] * 3, "interleaved",
        "attention.dense", "attention", None, (("mlp.act", "output"),), ("mlp.act", "output"),
        "mlp", "gpt_neox.final_layer_norm", "lm_head",
    ),
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2,
    "olmo2": _OLMO2,
    # GPT-J: its own _attn, probabilities through attn_dropout; parallel attention + MLP
    "gptj": Ref(
        "transformer.h", "attn", "attn.q_proj", "attn.k_proj", "attn.v_proj", None,
        "attn.out_proj", "attn", None, (("mlp.act", "output"),), ("mlp.act", "output"),
        "mlp", "transformer.ln_f", "lm_head", probs="attn.attn_dropout",
    ),
    "minilm": Ref(
        "encoder.layer", "attention.self", "attention.self.query", "attention.self.key",
        "attention.self.value", None, "attention.output.dense", "attention.output.dense",
        ("attention", "output"), (("intermediate", "output"),), ("intermediate", "output"),
        "output.dense", None, None,
    ),
}  # fmt: skip


@dataclass
class Case:
    """One architecture with its inputs and clean outputs."""

    name: str
    hf: nn.Module
    model: iv.Model
    call: dict[str, Tensor]  # forward kwargs for the plain runs
    base: Any  # what tracevene is given
    ref: Ref
    H: int
    Hkv: int
    dh: int
    D: int

    @property
    def decoder(self) -> bool:
        return self.name != "minilm"

    def out(self, output: Any) -> Tensor:
        """The tensor the tests compare: logits, or BERT's last hidden state."""
        return output.logits if self.decoder else output.last_hidden_state

    def layer(self, i: int) -> str:
        return f"{self.ref.layers}.{i}"


@functools.cache
def _minilm() -> tuple[nn.Module, dict[str, Tensor]]:
    tok = M.minilm_tokenizer()
    enc = tok(["Mary gave John a book", "Tom ran"], return_tensors="pt", padding=True)
    return M.minilm(), dict(enc)


@functools.cache
def case(name: str) -> Case:
    if name == "minilm":
        hf, call = _minilm()
        base = dict(call)
    else:
        hf = M.DECODERS[name](attn_implementation="eager")  # for output_attentions
        base = M.tokens(2, 6)
        call = {"input_ids": base, "use_cache": False}
    cfg = hf.config
    H = cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    model = iv.wrap(hf, backend="torch")
    return Case(name, hf, model, call, base, REFS[name], H, Hkv, dh, cfg.hidden_size)


# -- plain-hook machinery (no tracevene) ------------------------------------------------
def _first(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else x[0]


def _with_first(x: Any, new: Tensor) -> Any:
    return new if isinstance(x, Tensor) else (new, *x[1:])


def _eager(edit: Callable[[nn.Module, Tensor], Tensor]) -> Callable:
    """An eager attention function (as in HF's modeling files) that edits the weights."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  softcap=None, **kw):  # fmt: skip
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
        w = torch.matmul(query, key.transpose(2, 3)) * scaling
        if softcap is not None:  # Gemma 2: attention-logit soft-capping
            w = torch.tanh(w / softcap) * softcap
        if attention_mask is not None:
            w = w + attention_mask[:, :, :, : key.shape[-2]]
        w = nn.functional.softmax(w, dim=-1)
        w = edit(module, w)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    return attention


def plain_run(
    c: Case,
    edits: list[tuple[str, str, Callable]] = (),
    attention_edit: Callable[[nn.Module, Tensor], Tensor] | None = None,
    capture: list[tuple[str, str]] = (),
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> tuple[Any, dict[tuple[str, str], Tensor]]:
    """Run the HF model with plain hooks.

    ``edits``: ``(path, io, fn)``; for ``io="input"``, ``fn(x) -> x'`` on the first
    input; for ``"output"``, ``fn(x, module_input) -> x'`` on the first output.
    ``capture``: ``(path, io)`` whose tensors are recorded (after any edit registered
    earlier on the same point).
    """
    modules = dict(c.hf.named_modules())
    got: dict[tuple[str, str], Tensor] = {}
    handles = []

    def first_in(args: tuple, kwargs: dict) -> tuple[Tensor, str | None]:
        if args:
            return args[0], None
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return kwargs[key], key

    for path, io, fn in edits:
        mod = modules[path]
        if io == "input":

            def pre(m, args, kwargs, fn=fn):
                x, key = first_in(args, kwargs)
                new = fn(x)
                return ((new, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: new})

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(m, args, kwargs, out, fn=fn):
                x = first_in(args, kwargs)[0] if (args or kwargs) else None
                return _with_first(out, fn(_first(out), x))

            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    for path, io in capture:
        mod = modules[path]
        if io == "input":

            def cap_pre(m, args, kwargs, key=(path, io)):
                got[key] = first_in(args, kwargs)[0]

            handles.append(mod.register_forward_pre_hook(cap_pre, with_kwargs=True))
        else:

            def cap(m, args, out, key=(path, io)):
                got[key] = _first(out)

            handles.append(mod.register_forward_hook(cap))
    if attention_edit is not None and c.ref.probs:  # a plain hook on the probabilities
        for i in range(c.model.n_layers):
            attn = modules[f"{c.layer(i)}.{c.ref.attn}"]

            def on_probs(m, args, out, attn=attn, edit=attention_edit):
                return edit(attn, out)

            probs = modules[f"{c.layer(i)}.{c.ref.probs}"]
            handles.append(probs.register_forward_hook(on_probs))
        attention_edit = None
    try:
        if attention_edit is not None:
            attn_cls = type(modules[f"{c.layer(0)}.{c.ref.attn}"])
            globs = attn_cls.forward.__globals__
            assert "eager_attention_forward" in globs
            monkeypatch.setitem(globs, "eager_attention_forward", _eager(attention_edit))
        with torch.no_grad():
            output = c.hf(**c.call, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
        if attention_edit is not None:
            monkeypatch.undo()
    return output, got


@functools.cache
def clean(name: str) -> tuple[Any, dict[tuple[str, str], Tensor]]:
    """The clean output and every tensor the expected values are cut from."""
    c = case(name)
    r = c.ref
    points: list[tuple[str, str]] = []
    for i in range(c.model.n_layers):
        L = c.layer(i)
        points += [(L, "input"), (L, "output")]
        for p in {r.q, r.k, r.v, r.attn_out, r.mlp_out}:
            points.append((f"{L}.{p}", "output"))
        points += [(f"{L}.{r.o_proj}", "input"), (f"{L}.{r.o_proj}", "output")]
        if r.mid:
            points.append((f"{L}.{r.mid[0]}", r.mid[1]))
        points += [(f"{L}.{p}", io) for p, io in r.hidden_parts]
    if r.final:
        points.append((r.final, "output"))
    if not c.decoder:
        points.append(("embeddings", "output"))
    return plain_run(c, capture=points)


# -- expected site values, cut by hand from the captured tensors ----------------------
def _qkv(c: Case, which: str, proj_out: Tensor) -> Tensor:
    j = "qkv".index(which)
    n = c.Hkv if which in "kv" else c.H
    if c.ref.fused == "split":  # GPT-2: c_attn(x).split(d_model, dim=2)
        return proj_out.split(c.D, dim=-1)[j].unflatten(-1, (n, c.dh))
    if c.ref.fused == "interleaved":  # NeoX: view(..., H, 3 * dh).chunk(3, dim=-1)
        return proj_out.unflatten(-1, (n, 3 * c.dh)).chunk(3, dim=-1)[j]
    return proj_out.unflatten(-1, (n, c.dh))


def _head_weight(o_proj: nn.Module, h: int, dh: int) -> Tensor:
    """``[dh, D]``: the rows of the output projection that head h feeds."""
    w = o_proj.weight
    if isinstance(o_proj, nn.Linear):  # y = x @ W.T
        return w.T[h * dh : (h + 1) * dh]
    return w[h * dh : (h + 1) * dh]  # transformers Conv1D: y = x @ W


def expected(c: Case, name: str) -> Tensor:
    """The value of site ``name`` (display form) from the clean plain-hook run."""
    output, got = clean(c.name)
    r = c.ref
    modules = dict(c.hf.named_modules())
    if name == "embed":
        if c.name == "gpt2":
            ids = c.call["input_ids"]
            tr = c.hf.transformer
            return tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1]))
        if c.name == "neox":
            return c.hf.gpt_neox.embed_in(c.call["input_ids"])
        if c.name == "gptj":  # rotary positions: the token embedding only
            return c.hf.transformer.wte(c.call["input_ids"])
        if c.decoder:
            return c.hf.model.embed_tokens(c.call["input_ids"])
        return got[("embeddings", "output")]
    if name == "final":
        return got[(r.final, "output")]
    if name == "logits":
        return output.logits
    m = re.fullmatch(r"layer\[(\d+)\]\.(?:attn\.head\[(\d+)\]\.)?(.+)", name)
    i, h, key = int(m[1]), m[2], m[3]
    L = c.layer(i)
    if h is not None:
        h = int(h)
        if key == "out":
            z = got[(f"{L}.{r.o_proj}", "input")][..., h * c.dh : (h + 1) * c.dh]
            return z @ _head_weight(modules[f"{L}.{r.o_proj}"], h, c.dh)
        full = expected(c, f"layer[{i}].attn.{key}")
        return full[:, h] if key == "pattern" else full[:, :, h]
    if key == "resid_pre":
        return got[(L, "input")]
    if key == "resid_post":
        return got[(L, "output")]
    if key == "resid_mid":
        return got[(f"{L}.{r.mid[0]}", r.mid[1])]
    if key in ("attn.q", "attn.k", "attn.v"):
        proj = getattr(r, key[-1])
        return _qkv(c, key[-1], got[(f"{L}.{proj}", "output")])
    if key == "attn.pattern":
        return output.attentions[i]
    if key == "attn.z":
        return got[(f"{L}.{r.o_proj}", "input")].unflatten(-1, (c.H, c.dh))
    if key == "attn.out":
        return got[(f"{L}.{r.attn_out}", "output")]
    if key == "mlp.hidden":
        parts = [got[(f"{L}.{p}", io)] for p, io in r.hidden_parts]
        return functools.reduce(torch.mul, parts)
    if key == "mlp.out":
        return got[(f"{L}.{r.mlp_out}", "output")]
    raise AssertionError(f"no expectation for {name}")


# -- reading and writing sites by their display names through the DSL -----------------
def at(run: Any, name: str) -> Any:
    """``at(t, "layer[1].attn.head[2].q")`` is ``t.layer[1].attn.head[2].q``."""
    obj = run
    for part in name.split("."):
        m = re.fullmatch(r"(\w+)\[(-?\d+)\]", part)
        obj = getattr(obj, m[1])[int(m[2])] if m else getattr(obj, part)
    return obj


def write(run: Any, name: str, index: Any, value: Any) -> None:
    """``run.<name> = value`` (``index is None``) or ``run.<name>[index] = value``."""
    if index is None:
        parent, _, attr = name.rpartition(".")
        setattr(at(run, parent) if parent else run, attr, value)
    else:
        at(run, name)[index] = value


def concrete_sites(c: Case) -> list[str]:
    """``model.sites()`` with ``{h}`` replaced by the first and last valid head."""
    names = []
    for s in c.model.sites():
        if "{h}" not in s:
            names.append(s)
            continue
        n = c.Hkv if s.endswith((".k", ".v")) else c.H
        names += [s.replace("{h}", str(h)) for h in sorted({0, n - 1})]
    return names


def expected_shape(c: Case, name: str) -> tuple[int, ...]:
    B, P = c.call["input_ids"].shape
    cfg = c.hf.config
    M_ = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * c.D
    key = name.rsplit(".", 1)[-1]
    if (
        name in ("embed", "final")
        or key.startswith("resid")
        or name.endswith(("attn.out", "mlp.out"))
    ):
        return (B, P, c.D)
    if name == "logits":
        return (B, P, cfg.vocab_size)
    if key == "hidden":
        return (B, P, M_)
    head = ".head[" in name
    if key == "pattern":
        return (B, P, P) if head else (B, c.H, P, P)
    if key == "out":  # head[h].out
        return (B, P, c.D)
    n = c.Hkv if key in "kv" else c.H
    return (B, P, c.dh) if head else (B, P, n, c.dh)


# -- the vocabulary each model offers, and its dimensions ------------------------------
def test_dimensions():
    want = {"gpt2": (3, 4, 32), "neox": (3, 4, 32), "llama": (3, 4, 32), "qwen2": (3, 4, 32),
            "mistral": (3, 4, 32), "minilm": (6, 12, 384)}  # fmt: skip
    for name, dims in want.items():
        m = case(name).model
        assert (m.n_layers, m.n_heads, m.d_model) == dims, name
    mlp = iv.wrap(M.mlp(), backend="torch")
    assert (mlp.n_layers, mlp.n_heads, mlp.d_model) == (None, None, None)
    assert mlp.sites() == []


@pytest.mark.parametrize("name", ARCHS)
def test_sites_listing(name):
    c = case(name)
    sites = c.model.sites()
    n = c.model.n_layers
    assert sites[0] == "embed" and f"layer[{n - 1}].resid_post" in sites
    per_layer = {s.split(".", 1)[1] for s in sites if s.startswith("layer[0].")}
    attn = {f"attn.{k}" for k in ("q", "k", "v", "pattern", "z", "out")}
    heads = {f"attn.head[{{h}}].{k}" for k in ("q", "k", "v", "pattern", "z", "out")}
    common = {"resid_pre", "mlp.hidden", "mlp.out", "resid_post"} | attn | heads
    if REFS[name].mid is None:  # parallel attention + MLP: no residual between them
        assert per_layer == common
    else:
        assert per_layer == common | {"resid_mid"}
    tops = [s for s in sites if not s.startswith("layer")]
    assert tops == (["embed", "final", "logits"] if c.decoder else ["embed"])
    assert len(sites) == n * len(per_layer) + len(tops)


# -- reads: every site equals an independent plain-hook value --------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_read_every_site(name):
    c = case(name)
    names = concrete_sites(c)
    plain = [s for s in names if not s.endswith("pattern")]
    with iv.trace(c.model, c.base) as t:
        saved = {s: at(t, s).save() for s in plain}
    problems = []
    for s in plain:
        got, want = saved[s].value, expected(c, s)
        if got.shape != expected_shape(c, s):
            problems.append(f"{s}: shape {tuple(got.shape)}, want {expected_shape(c, s)}")
        elif got.shape != want.shape or not torch.allclose(
            got, want, **numerics.tolerance(numerics.magnitude(want))
        ):
            err = (got - want).abs().max().item() if got.shape == want.shape else "shape"
            problems.append(f"{s}: differs from the plain-hook value (max abs error {err})")
    assert not problems, "\n".join(problems)
    # Reading changes nothing: the run's output is the clean one, bit for bit.
    assert torch.equal(c.out(t.output), c.out(clean(name)[0]))


@pytest.mark.parametrize("name", ARCHS)
def test_read_every_site_exactly(name):
    """Reads that are plain hook tensors (no arithmetic) are bit-identical."""
    c = case(name)
    names = [s for s in concrete_sites(c) if not s.endswith(("pattern", "].out"))]
    with iv.trace(c.model, c.base) as t:
        saved = {s: at(t, s).save() for s in names}
    bad = [s for s in names if not torch.equal(saved[s].value, expected(c, s))]
    assert not bad, f"not bit-identical: {bad}"


@pytest.mark.parametrize("name", ARCHS)
def test_read_pattern(name):
    """Attention probabilities equal ``output_attentions=True`` under eager attention."""
    c = case(name)
    pats = [s for s in concrete_sites(c) if s.endswith("pattern")]
    with iv.trace(c.model, c.base) as t:
        saved = {s: at(t, s).save() for s in pats}
    for s in pats:
        got, want = saved[s].value, expected(c, s)
        assert got.shape == expected_shape(c, s) == want.shape, s
        numerics.assert_close(got, want, what=f"{s} vs output_attentions")
        rows = got.sum(-1)  # every query's probabilities sum to one
        numerics.assert_close(rows, torch.ones_like(rows), what=f"{s} row sums", ulps=numerics.OP)
    # Reading the pattern re-routes attention through tracevene's own kernel: the
    # output must still match the clean eager run.
    numerics.assert_close(
        c.out(t.output), c.out(clean(name)[0]), what="output after a pattern read vs clean"
    )


@pytest.mark.parametrize("name", ARCHS)
def test_attention_algebra(name):
    """z = pattern @ v per head; heads' out sum (+ bias) to the output projection."""
    c = case(name)
    r = c.ref
    modules = dict(c.hf.named_modules())
    rep = c.H // c.Hkv
    n = c.model.n_layers
    with iv.trace(c.model, c.base) as t:  # one pass reads every layer
        saved = []
        for i in range(n):
            a = t.layer[i].attn
            saved.append(
                dict(
                    pat=a.pattern.save(), v=a.v.save(), z=a.z.save(), out=a.out.save(),
                    heads=[a.head[h].out.save() for h in range(c.H)],
                    pre=t.layer[i].resid_pre.save(),
                    mid=t.layer[i].resid_mid.save() if r.mid else None,
                )
            )  # fmt: skip
    for i, s in enumerate(saved):
        # z[b, p, h] = sum_q pattern[b, h, p, q] v[b, q, h // rep]
        v_q = s["v"].value.repeat_interleave(rep, dim=2)
        z_hand = torch.einsum("bhpq,bqhd->bphd", s["pat"].value, v_q)
        numerics.assert_close(
            s["z"].value, z_hand, what=f"layer {i} z vs pattern @ v", ulps=numerics.OP,
            scale=numerics.magnitude(s["v"].value),
        )  # fmt: skip
        o_proj = modules[f"{c.layer(i)}.{r.o_proj}"]
        total = sum(x.value for x in s["heads"])
        if o_proj.bias is not None:
            total = total + o_proj.bias
        # attn.out is the output projection's output on every mapped architecture
        numerics.assert_close(total, s["out"].value, what=f"layer {i} sum of head outs vs attn.out")
        if name in PRE_LN:
            assert torch.equal(s["mid"].value, s["pre"].value + s["out"].value)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_read_negative_indices(name):
    c = case(name)
    with iv.trace(c.model, c.base) as t:
        a = t.layer[-1].resid_post.save()
        b = t.layer[c.model.n_layers - 1].resid_post.save()
        h = t.layer[0].attn.head[-1].q.save()
    assert torch.equal(a.value, b.value)
    assert torch.equal(h.value, expected(c, f"layer[0].attn.head[{c.H - 1}].q"))


# -- writes: every site kind, full and indexed, against the same plain-hook change -----
LAYER_KINDS = [
    "resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.out",
    "attn.head[1].q", "attn.head[1].k", "attn.head[1].v", "attn.head[1].pattern",
    "attn.head[1].z", "attn.head[1].out", "resid_mid", "mlp.hidden", "mlp.out", "resid_post",
]  # fmt: skip
KINDS = ["embed", *LAYER_KINDS, "final", "logits"]


def _plain_edit(c: Case, site: str, change: Callable[[Tensor], Tensor]):
    """``(edits, attention_edit)`` making ``change`` to ``site`` with plain hooks.

    ``change`` maps the site's old tensor to its new one.
    """
    r = c.ref
    modules = dict(c.hf.named_modules())
    if site == "embed":
        return [(c.layer(0), "input", change)], None
    if site == "final":
        return [(r.final, "output", lambda x, _: change(x))], None
    if site == "logits":
        return [(r.lm_head, "output", lambda x, _: change(x))], None
    m = re.fullmatch(r"layer\[(\d+)\]\.(?:attn\.head\[(\d+)\]\.)?(.+)", site)
    i, h, key = int(m[1]), m[2], m[3]
    L = c.layer(i)
    if h is not None:
        h = int(h)
        key = "head." + key
    if key == "resid_pre":
        return [(L, "input", change)], None
    if key == "resid_post":
        return [(L, "output", lambda x, _: change(x))], None
    if key in ("attn.q", "attn.k", "attn.v", "head.q", "head.k", "head.v"):
        which = key[-1]
        j = "qkv".index(which)
        n = c.Hkv if which in "kv" else c.H

        def qkv(x, _):
            view = _qkv(c, which, x)
            new = view.clone()
            if h is None:
                new = change(view)
            else:
                new[:, :, h] = change(view[:, :, h])
            y = x.clone()
            if c.ref.fused == "split":
                y[..., j * c.D : (j + 1) * c.D] = new.flatten(-2)
            elif c.ref.fused == "interleaved":
                y.view(*x.shape[:-1], n, 3 * c.dh)[..., j * c.dh : (j + 1) * c.dh] = new
            else:
                y = new.flatten(-2)
            return y

        return [(f"{L}.{getattr(r, which)}", "output", qkv)], None
    if key in ("attn.pattern", "head.pattern"):
        target = modules[f"{L}.{r.attn}"]

        def edit(module, w):
            if module is not target:
                return w
            if h is None:
                return change(w)
            w = w.clone()
            w[:, h] = change(w[:, h])
            return w

        return [], edit
    if key in ("attn.z", "head.z"):

        def z_edit(x):
            z = x.unflatten(-1, (c.H, c.dh)).clone()
            if h is None:
                z = change(z)
            else:
                z[:, :, h] = change(z[:, :, h])
            return z.flatten(-2)

        return [(f"{L}.{r.o_proj}", "input", z_edit)], None
    if key == "head.out":
        o_proj = modules[f"{L}.{r.o_proj}"]

        def head_edit(y, x):
            old = x[..., h * c.dh : (h + 1) * c.dh] @ _head_weight(o_proj, h, c.dh)
            return y + (change(old) - old)

        return [(f"{L}.{r.o_proj}", "output", head_edit)], None
    if key == "attn.out":
        return [(f"{L}.{r.attn_out}", "output", lambda x, _: change(x))], None
    if key == "resid_mid":
        if c.name == "minilm":  # post-LN: the attention block's output is the residual
            return [(f"{L}.{r.mid[0]}", "output", lambda x, _: change(x))], None
        pre: dict[str, Tensor] = {}

        def keep_pre(x):
            pre["x"] = x
            return x

        def mid_edit(out, _):  # resid_mid = resid_pre + attn_out
            mid = pre["x"] + out
            return out + (change(mid) - mid)

        added = f"{L}.{r.mid_add or r.attn_out}"
        return [(L, "input", keep_pre), (added, "output", mid_edit)], None
    if key == "mlp.hidden":
        path, io = r.hidden_write
        path = f"{L}.{path}"
        if io == "input":
            return [(path, io, change)], None
        return [(path, io, lambda x, _: change(x))], None
    if key == "mlp.out":
        return [(f"{L}.{r.mlp_out}", "output", lambda x, _: change(x))], None
    raise AssertionError(site)


def _kind_site(c: Case, kind: str) -> str | None:
    if kind in ("embed", "final", "logits"):
        return kind if kind in c.model.sites() else None
    layer = 1 if c.decoder else 2
    name = f"layer[{layer}].{kind}"
    probe = name.replace("head[1]", "head[{h}]")
    return name if probe in c.model.sites() else None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ARCHS)
def test_write_matches_plain_hook(name, kind, monkeypatch):
    c = case(name)
    site = _kind_site(c, kind)
    if site is None:
        pytest.skip(f"{name} has no {kind} site (tested in test_site_errors.py)")
    shape = expected_shape(c, site)
    clean_out = c.out(clean(name)[0])
    g = torch.Generator().manual_seed(KINDS.index(kind))
    for index in (None, (slice(None), 2)):
        target = torch.empty(shape)[index] if index is not None else torch.empty(shape)
        value = torch.randn(target.shape, generator=g)

        def change(old, index=index, value=value):
            if index is None:
                return value.expand(old.shape).clone()
            new = old.clone()
            new[index] = value
            return new

        with iv.trace(c.model, c.base) as t:
            write(t, site, index, value)
        got = c.out(t.output)
        edits, attention_edit = _plain_edit(c, site, change)
        want = c.out(plain_run(c, edits, attention_edit, monkeypatch=monkeypatch)[0])
        label = f"{site}{'' if index is None else '[:, 2]'}"
        assert not torch.allclose(want, clean_out), f"{label}: the plain edit changed nothing"
        numerics.assert_close(got, want, what=f"{label}: output after the write vs a plain edit")


@pytest.mark.parametrize("name", ARCHS)
def test_plain_attention_matches_eager(name, monkeypatch):
    """The test's own attention function (used for pattern writes) is HF's eager."""
    c = case(name)
    out = plain_run(c, attention_edit=lambda m, w: w, monkeypatch=monkeypatch)[0]
    numerics.assert_close(c.out(out), c.out(clean(name)[0]), what="plain eager attention vs HF")


def test_write_in_place_and_read_after_write():
    c = case("gpt2")
    with iv.trace(c.model, c.base) as t:
        before = t.layer[1].mlp.out[:, 2].save()
        t.layer[1].mlp.out[:, 2] += 1.5
        after = t.layer[1].mlp.out[:, 2].save()
    numerics.assert_close(
        after.value, before.value + 1.5, what="read after += 1.5", ulps=numerics.OP
    )
    assert torch.equal(before.value, expected(c, "layer[1].mlp.out")[:, 2])

    def change(x):
        y = x.clone()
        y[:, 2] += 1.5
        return y

    want = c.out(plain_run(c, *_plain_edit(c, "layer[1].mlp.out", change))[0])
    numerics.assert_close(c.out(t.output), want, what="output after += vs a plain edit")


BATCH_KINDS = [
    "attn.q", "attn.head[1].k", "attn.head[1].pattern", "attn.head[1].out", "resid_mid",
    "mlp.hidden",
]  # fmt: skip


@functools.cache
def source_input(name: str) -> Any:
    """A different input of the same shape as the base (so runs can share a batch)."""
    c = case(name)
    if c.decoder:
        return M.tokens(2, 6, seed=2)
    P = c.call["input_ids"].shape[1]
    tok = M.minilm_tokenizer()
    enc = tok(["John saw Mary", "Alice met Bob"], return_tensors="pt", padding="max_length",
              max_length=P)  # fmt: skip
    return dict(enc)


@pytest.mark.parametrize("kind", BATCH_KINDS)
@pytest.mark.parametrize("name", ARCHS)
def test_interchange_batched_equals_sequential(name, kind):
    """Views that need more than the hooked rows (head out, resid_mid) slice rows right."""
    c = case(name)
    site = _kind_site(c, kind)
    if site is None:
        pytest.skip(f"{name} has no {kind} site")
    got = {}
    for schedule in ("sequential", "batched"):
        with iv.trace(c.model, c.base, schedule=schedule) as t:
            src = t.source(source_input(name))
            at(t, site)[:, 2] = at(src, site)[:, 2]
            after = at(t, site).save()
            from_src = at(src, site).save()
        got[schedule] = c.out(t.output), after.value, from_src.value
        # head out and resid_mid are views computed from the hooked tensors: read back
        # after the write, they are recomputed (another summation order), not copied
        numerics.assert_close(
            after.value[:, 2], from_src.value[:, 2], what=f"{site} read after the write",
            ulps=numerics.OP,
        )  # fmt: skip
    for a, b in zip(got["sequential"], got["batched"], strict=True):
        numerics.assert_close(a, b, what=f"{site}: batched vs sequential schedule")
    assert not torch.allclose(got["batched"][0], c.out(clean(name)[0]))


# -- identity: patching a run into itself changes nothing -----------------------------
@pytest.mark.parametrize("schedule", ["sequential", "batched"])
@pytest.mark.parametrize("name", ARCHS)
def test_identity_patch_is_exact(name, schedule):
    c = case(name)
    with iv.trace(c.model, c.base, schedule=schedule) as t:
        src = t.source(c.base)
        for i in range(c.model.n_layers):
            t.layer[i].resid_post = src.layer[i].resid_post
    got = c.out(t.output)
    want = c.out(clean(name)[0])
    if schedule == "sequential":
        assert torch.equal(got, want)
        return
    # Batched: base and source share one forward of twice the batch. The result must be
    # bit-identical to the clean output of that doubled batch (same kernels, same shapes).
    # Against the batch-2 clean output it is float32-close only: kernels for another batch
    # size may round differently (MiniLM's batch-4 kernels do on every CPU seen so far).
    doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in c.call.items()}
    with torch.no_grad():
        ref = c.out(c.hf(**doubled))
    B = c.call["input_ids"].shape[0]
    numerics.assert_exact(got, ref[:B], what="batched identity patch vs the doubled clean batch")
    numerics.assert_close(got, want, what="batched identity patch vs the batch-2 clean output")


@pytest.mark.parametrize("name", ARCHS)
def test_batched_plan_really_batches(name):
    c = case(name)
    with iv.trace(c.model, c.base, schedule="batched") as t:
        src = t.source(c.base)
        t.layer[0].resid_post = src.layer[0].resid_post
    result = t.program.run(c.model, c.base, [c.base], schedule="batched")
    assert len(result.plan.passes) == 1 and result.plan.passes[0].runs == [0, 1]


# -- grouped-query attention --------------------------------------------------------------
def test_gqa_write_k_changes_only_written_kv_head():
    c = case("llama")
    assert (c.H, c.Hkv) == (4, 2)
    clean_out, _ = clean("llama")
    value = torch.randn(2, 6, c.dh)
    with iv.trace(c.model, c.base, output_attentions=True) as t:
        t.layer[1].attn.head[1].k = value
        k = t.layer[1].attn.k.save()
    k_clean = expected(c, "layer[1].attn.k")
    assert k.value.shape == (2, 6, c.Hkv, c.dh)
    assert torch.equal(k.value[:, :, 0], k_clean[:, :, 0])
    assert torch.equal(k.value[:, :, 1], value)
    # Query heads 0, 1 read key-value head 0 (unchanged); 2, 3 read head 1 (written).
    pat, pat_clean = t.output.attentions[1], clean_out.attentions[1]
    numerics.assert_close(pat[:, :2], pat_clean[:, :2], what="patterns of unwritten kv head 0")
    for q in (2, 3):
        assert not torch.allclose(pat[:, q], pat_clean[:, q])
    # Earlier layers are untouched.
    torch.testing.assert_close(t.output.attentions[0], clean_out.attentions[0], atol=0, rtol=0)


def test_gqa_head_sites_use_kv_heads():
    c = case("llama")
    with iv.trace(c.model, c.base) as t:
        q3 = t.layer[0].attn.head[3].q.save()
        k1 = t.layer[0].attn.head[1].k.save()
        v1 = t.layer[0].attn.head[1].v.save()
    assert torch.equal(q3.value, expected(c, "layer[0].attn.q")[:, :, 3])
    assert torch.equal(k1.value, expected(c, "layer[0].attn.k")[:, :, 1])
    assert torch.equal(v1.value, expected(c, "layer[0].attn.v")[:, :, 1])


def test_head_dim_differs_from_d_over_h():
    c = case("mistral")
    assert c.dh == 16 != c.D // c.H
    with iv.trace(c.model, c.base) as t:
        q = t.layer[0].attn.q.save()
        k = t.layer[0].attn.k.save()
        z = t.layer[0].attn.z.save()
    assert q.value.shape == (2, 6, 4, 16)
    assert k.value.shape == (2, 6, 2, 16)
    assert z.value.shape == (2, 6, 4, 16)


# -- module sites on models without a site table ----------------------------------------
def _hooked(module: nn.Module, x: Tensor, path: str, io: str, fn=None):
    """Plain-hook read (``fn=None``) or write (``fn(old) -> new``) at one point."""
    sub = module.get_submodule(path)
    got = {}
    if io == "input":

        def pre(m, args):
            got["x"] = args[0]
            return None if fn is None else (fn(args[0]), *args[1:])

        h = sub.register_forward_pre_hook(pre)
    else:

        def post(m, args, out):
            got["x"] = _first(out)
            return None if fn is None else _with_first(out, fn(_first(out)))

        h = sub.register_forward_hook(post)
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        h.remove()
    return got["x"], out


def test_module_sites_on_sequential():
    net = M.mlp()
    model = iv.wrap(net, backend="torch")
    x = torch.randn(3, 4)
    with iv.trace(model, x) as t:
        a_in = t.module("2").input.save()
        a_out = t.module("2").output.save()
        relu = t.module("3").output.save()
    assert torch.equal(a_in.value, _hooked(net, x, "2", "input")[0])
    assert torch.equal(a_out.value, _hooked(net, x, "2", "output")[0])
    assert torch.equal(relu.value, _hooked(net, x, "3", "output")[0])
    assert torch.equal(t.output, net(x))

    def zero_first3(h):
        h = h.clone()
        h[:, :3] = 0
        return h

    with iv.trace(model, x) as t:
        t.module("1").output[:, :3] = 0
    assert torch.equal(t.output, _hooked(net, x, "1", "output", zero_first3)[1])
    new_in = torch.randn(3, 16)
    with iv.trace(model, x) as t:
        t.module("4").input = new_in
    assert torch.equal(t.output, _hooked(net, x, "4", "input", lambda _: new_in)[1])
    assert torch.equal(t.output, net[4](new_in))


def test_module_sites_on_gru():
    net = M.gru()
    model = iv.wrap(net, backend="torch")
    x = torch.randn(2, 7, 5)
    with iv.trace(model, x) as t:
        seq = t.module("gru").output.save()
        head_in = t.module("head").input.save()
    seq_ref, _ = _hooked(net, x, "gru", "output")
    assert seq.value.shape == (2, 7, 8)
    assert torch.equal(seq.value, seq_ref)
    assert torch.equal(head_in.value, _hooked(net, x, "head", "input")[0])
    assert torch.equal(head_in.value, seq_ref[:, -1])

    new = torch.randn(2, 7, 8)
    with iv.trace(model, x) as t:
        t.module("gru").output = new
        head_in = t.module("head").input.save()
    _, want = _hooked(net, x, "gru", "output", lambda _: new)
    assert torch.equal(t.output, want)
    assert torch.equal(t.output, net.head(new[:, -1]))
    assert torch.equal(head_in.value, new[:, -1])

    def zero_last_step(o):
        o = o.clone()
        o[:, -1, :4] *= 0
        return o

    with iv.trace(model, x) as t:
        t.module("gru").output[:, -1, :4] *= 0
    assert torch.equal(t.output, _hooked(net, x, "gru", "output", zero_last_step)[1])


def test_logits_on_bert_with_its_lm_head():
    """A BERT model with its masked-LM head has logits (a bare BertModel does not)."""
    cfg = transformers.BertConfig(
        vocab_size=M.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(cfg).eval()
    model = iv.wrap(hf, backend="torch")
    assert "logits" in model.sites() and "final" not in model.sites()
    ids = M.tokens(2, 5)
    with iv.trace(model, ids) as t:
        logits = t.logits.save()
        post = t.layer[-1].resid_post.save()
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
    assert torch.equal(logits.value, out.logits)
    assert torch.equal(post.value, out.hidden_states[-1])


def test_module_site_on_hf_model_matches_vocab_site():
    c = case("gpt2")
    with iv.trace(c.model, c.base) as t:
        a = t.module("transformer.h.1.mlp").output.save()
        b = t.layer[1].mlp.out.save()
    assert torch.equal(a.value, b.value)


def test_negative_head_index_counts_from_the_sites_own_heads_under_gqa():
    model = iv.wrap(M.llama())  # 4 query heads, 2 key/value heads
    ids = M.tokens()
    with iv.trace(model, ids) as t:
        k_last = t.layer[0].attn.head[-1].k.save()
        q_last = t.layer[0].attn.head[-1].q.save()
        k_all = t.layer[0].attn.k.save()
        q_all = t.layer[0].attn.q.save()
    assert torch.equal(k_last.value, k_all.value[:, :, 1])
    assert torch.equal(q_last.value, q_all.value[:, :, 3])
    with pytest.raises(iv.SiteError, match=r"head -3 is out of range .*key/value heads 0\.\.1"):
        with iv.trace(model) as t:
            t.layer[0].attn.head[-3].v.save()
