"""Float32 tolerances for the tests, from an error model rather than from one CPU.

Two computations of the same value in float32 round differently when they run
through other kernels (AVX2 or AVX-512, MKL's or oneDNN's code paths, chosen per
CPU), another reduction order, another batch size or another split of the work.
So a test that compares two such computations must allow for rounding, and must
allow for it at the magnitudes involved: one rounding moves a result by up to
half a unit in the last place, a relative ``EPS32 = 2**-23 ~ 1.19e-7``, so an
absolute 1e-6 is 8 ulps at magnitude 1 but less than one ulp at magnitude 10.

The rule used everywhere (``tolerance``):

    atol = ulps * EPS32 * scale        rtol = ulps * EPS32

``scale`` is the largest magnitude among the quantities that were combined: by
default the largest ``|want|``, but for a result computed by cancellation (a
logit difference, the change one patch makes) it is the magnitude of the terms
(the logits), passed explicitly. ``ulps`` says how much computation lies between
the two sides, in three tiers:

- ``EXACT``: same kernels on the same shapes in the same order. Compare with
  ``assert_exact`` (``torch.equal``): any difference is a bug.
- ``OP`` (16 ulps): one operation (a matmul, a softmax, a norm) computed by
  another kernel or in another order. A length-n reduction's rounding error
  grows like sqrt(n) ulps of its terms' magnitude; 16 covers n up to a few
  hundred with room to spare.
- ``MODEL`` (256 ulps): a forward pass through a model (several layers, each a
  few reductions of up to ~1500 terms: d_mlp, vocabulary slices) computed two
  ways, e.g. hooks against an independent reference, batched against
  sequential, sdpa against eager attention. Per-layer errors of ~sqrt(n) ulps
  add up over the layers and are amplified by LayerNorm and softmax.
- ``TRAINED`` (4096 ulps): a result after gradient steps, where each step's
  rounding feeds the next (an optimizer's state multiplies small differences).

Real defects move values by far more than these bounds (a patched cell, a wrong
head or position changes activations by O(1) of their scale), so the tolerances
stay able to fail. ``ATEN_CPU_CAPABILITY=default`` (a second kernel path, run by
.ci/run) checks that they hold beyond this machine's kernels.

Set ``TRACEVENE_TOL_LOG=path`` to append one JSON line per comparison (test,
what, ulps allowed, error in ulps) for measuring the largest errors seen.
"""

from __future__ import annotations

import json
import os

import torch

EPS32 = torch.finfo(torch.float32).eps
EXACT = 0
OP = 16
MODEL = 256
TRAINED = 4096


def magnitude(*tensors: torch.Tensor | float) -> float:
    """The largest absolute value among ``tensors`` (at least the tiniest normal float)."""
    values = [torch.as_tensor(t).detach().abs().max().item() for t in tensors]
    return max(values + [torch.finfo(torch.float32).tiny])


def tolerance(scale: float, ulps: int = MODEL) -> dict[str, float]:
    """``assert_close`` keyword arguments for ``ulps`` float32 ulps at magnitude ``scale``."""
    return {"atol": ulps * EPS32 * scale, "rtol": ulps * EPS32}


def assert_close(
    got: torch.Tensor | float,
    want: torch.Tensor | float,
    *,
    what: str,
    ulps: int = MODEL,
    scale: float | None = None,
) -> None:
    """Assert ``got`` equals ``want`` within ``ulps`` float32 ulps of the magnitudes involved.

    Args:
        got: The value under test.
        want: The independently computed value.
        what: What is compared, for the failure message (for example
            ``"resid_mid of the patched run vs plain hooks"``).
        ulps: The tier: ``OP``, ``MODEL`` or ``TRAINED`` (see the module docstring).
        scale: The magnitude of the quantities combined; default the largest ``|want|``.
    """
    got_t = torch.as_tensor(got).detach()
    want_t = torch.as_tensor(want).detach().to(got_t.device)
    if scale is None:
        scale = magnitude(want_t)
    tol = tolerance(scale, ulps)
    _log(got_t, want_t, what, ulps, scale)
    torch.testing.assert_close(
        got_t,
        want_t,
        **tol,
        check_dtype=False,
        msg=lambda m: f"{what} (allowed {ulps} ulps at magnitude {scale:.3g}):\n{m}",
    )


def assert_exact(got: torch.Tensor, want: torch.Tensor, *, what: str) -> None:
    """Assert bit-identical tensors: the same kernels computed the same thing in the same order."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got.detach(), want.detach()):
        err = (got.detach().double() - want.detach().double()).abs().max().item()
        raise AssertionError(f"{what}: not bit-identical (max abs difference {err:.3g})")


def _log(got: torch.Tensor, want: torch.Tensor, what: str, ulps: int, scale: float) -> None:
    path = os.environ.get("TRACEVENE_TOL_LOG")
    if not path or got.shape != want.shape or not got.is_floating_point():
        return
    diff = (got.double() - want.double()).abs()
    allowed = EPS32 * (scale + want.double().abs())  # one ulp of atol + rtol at each element
    err = (diff / allowed).max().item() if diff.numel() else 0.0
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, "what": what, "ulps": ulps, "err_ulps": err}) + "\n")
