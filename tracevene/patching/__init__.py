"""Patching experiments built on programs: many experiments per forward pass.

- ``activation_patching``: patch one cell (layer, position, head) at a time.
- ``attribution_patching``: its linear approximation, every cell at once.
- ``path_patching``: a sender's effect along chosen paths only (Wang et al. 2023).
- ``causal_tracing``: ROME's causal trace, noised tokens and restored clean states.
- ``run_circuit`` / ``head_means``: keep a circuit, mean-ablate other heads.
"""

from .activation import activation_patching
from .attribution import attribution_patching
from .circuits import head_means, run_circuit
from .paths import Head, Mlp, Resid, path_patching
from .result import PatchResult
from .tracing import CausalTrace, causal_tracing, embedding_noise

__all__ = [
    "CausalTrace",
    "Head",
    "Mlp",
    "PatchResult",
    "Resid",
    "activation_patching",
    "attribution_patching",
    "causal_tracing",
    "embedding_noise",
    "head_means",
    "path_patching",
    "run_circuit",
]
