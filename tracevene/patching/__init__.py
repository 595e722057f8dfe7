"""Patching experiments built on programs: many experiments per forward pass.

- :func:`activation_patching`: patch one cell (layer, position, head) at a time.
"""

from .activation import activation_patching
from .result import PatchResult

__all__ = ["PatchResult", "activation_patching"]
