"""The eager-attention route: attention probabilities as a hook point (``attn.pattern``).

Hugging Face models compute attention through a registered attention function; while
a pass reads or writes ``attn.pattern`` their configs are switched to
``ATTENTION_NAME``, an eager implementation with the same numbers that calls
``PATTERN_HOOKS[id(module)]`` on the probabilities. Every engine shares it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

ATTENTION_NAME = "tracevene_eager"
#: id(attention module) -> callback on its probabilities, for the pass in progress
PATTERN_HOOKS: dict[int, Any] = {}


def _attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw
):
    """Eager attention with a hook on the probabilities (same numbers as HF's eager).

    ``softcap`` is Gemma 2's attention-logit soft-capping (``cap * tanh(scores / cap)``
    before the mask), which HF's eager attention of those models applies.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    hook = PATTERN_HOOKS.get(id(module))
    if hook is not None:
        weights = hook(weights)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


_registered = False
#: id(config) -> [config, its own _attn_implementation, passes using the switch]
_switched: dict[int, list] = {}
_switch_lock = threading.Lock()


def pattern_attention(
    root: nn.Module | None, active: bool
) -> contextlib.AbstractContextManager[None]:
    """Route the attention of the HF models inside ``root`` through ``_attention``.

    Switches every Hugging Face config found on ``root``'s modules for the duration of
    one pass, and restores them whatever happens. Passes that overlap (runs on one
    module are serialised by ``engine.module_lock``, but two wrapped modules may share
    a config) count their uses: the first saves the config's own value, the last puts
    it back, so a config is never left switched.
    """
    if not active or root is None:
        return contextlib.nullcontext()
    return _switch(root)


@contextlib.contextmanager
def _switch(root: nn.Module) -> Iterator[None]:
    global _registered
    from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
    from transformers.masking_utils import eager_mask

    found = (getattr(m, "config", None) for m in root.modules())
    configs = {id(c): c for c in found if isinstance(c, PretrainedConfig)}
    with _switch_lock:
        if not _registered:
            AttentionInterface.register(ATTENTION_NAME, _attention)
            AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
            _registered = True
        for k, c in configs.items():
            if k not in _switched:
                _switched[k] = [c, c._attn_implementation, 0]
            _switched[k][2] += 1
            c._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        with _switch_lock:
            for k in configs:
                entry = _switched[k]
                entry[2] -= 1
                if entry[2] == 0:
                    entry[0]._attn_implementation = entry[1]
                    del _switched[k]
