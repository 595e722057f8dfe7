"""DAS training with tracevene's ``iv.train`` against pyvene 0.1.8: throughput and memory.

Trains, in one run, on a randomly initialised GPT-2 (12 layers, d_model 768, 12 heads,
vocab 50257; eval mode, float32, CPU, weights frozen) at batch 8 x 32 tokens, one
distributed-alignment-search intervention at the output of block 6 (tracevene
``t.layer[6].resid_post``, pyvene ``"block_output"`` of layer 6) at the last position,
interchanging ``k`` rotated dimensions (default 16) from one source. Loss: cross-entropy
of counterfactual labels (random token ids, the same for both) at the last position;
Adam, lr 1e-3; the same batches, in the same order, for every variant:

* ``tracevene | low-rank``: ``iv.LowRankRotatedSpace(768, k)`` (a ``768 x k`` basis,
  orthonormal through a QR parametrization);
* ``tracevene | full, cayley``: ``iv.RotatedSpace(768, k)``, tracevene's default map;
* ``tracevene | full, matrix_exp``: ``iv.RotatedSpace(768, k, orthogonal_map="matrix_exp")``,
  the same map as pyvene's;
* ``pyvene | low-rank``: ``LowRankRotatedSpaceIntervention`` (``low_rank_dimension=k``;
  ``torch.nn.utils.parametrizations.orthogonal`` picks its Householder map for a
  ``768 x k`` matrix);
* ``pyvene | full``: ``RotatedSpaceIntervention`` (``set_interchange_dim(k)``; a
  ``768 x 768`` rotation, which ``orthogonal`` parametrizes with ``matrix_exp``).

One training run is ``--epochs`` (default 2) passes over ``--steps`` (default 3)
batches. tracevene trains with ``iv.train(program, model, batches, epochs=..., lr=1e-3)``
(torch backend by default, ``--backend``; with more than one epoch ``iv.train`` serves
the clean source passes of later epochs from its source cache); pyvene with the loop of
its DAS tutorials: ``IntervenableModel`` forward with
``unit_locations={"sources->base": last}``, the same loss, ``loss.backward()``,
``Adam.step()``, zero grad (no per-step metric, no scheduler: the least work pyvene
can do). Before timing, each pair starts from the same rotation (pyvene's initial
weights copied into tracevene's intervention), and the losses on the first batch are
compared; the ``matrix_exp`` pair computes the same function of the same parameters, so
its training losses are compared at every step too (they drift apart slowly: Adam's
normalised updates amplify rounding differences).

Throughput: the variants' training runs are interleaved (their order rotates every
repeat) after one warm-up run each. Each step is timed (both clocks are read whenever
the trainer takes the next batch), so the first epoch and the later ones are reported
apart as well as the whole run. Times are medians over the repeats; "x pyvene" is the
median over the repeats of pyvene's time / tracevene's time within one repeat (a
throughput ratio: above 1 means tracevene trains faster), for wall-clock time
(``time.perf_counter``) and this process's CPU time (``time.process_time``). The cost
of ``matrix_exp`` grows with the norm of the trained skew-symmetric matrix (more
squarings), so the full-rotation figures depend on how far training has gone: the
norm is reported.

Memory: each variant also does one training run in its own child process, forked
before this process computes anything. The child loads the model, runs one forward and
backward of the bare model (so that kernel code and thread buffers are in place for
both libraries), resets the peak resident set size (``/proc/self/clear_refs``) and
notes the resident size; the figure is the peak during training (``VmHWM`` of
``/proc/self/status``) minus that. The child sets a fixed mmap threshold
(``mallopt(M_MMAP_THRESHOLD, 64 KiB)``), so that freed tensors leave the resident set
at once and the peak follows the live tensors (reproducible to ~1 MiB); with glibc's
default, adaptive threshold the figure depends on what the heap kept from earlier
allocations (10 to 100 MiB for the same variant). Target: at least 1.5x pyvene's
throughput at no more memory.

Usage::

    python bench/das.py              # the full benchmark (~10 minutes on a 2-core CPU)
    python bench/das.py --quick      # smoke run: tiny model, 2 repeats
    python bench/das.py --json out.json

The exit status is 0 unless ``--strict`` is given and a target is missed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import CLOCKS, FULL, QUICK, build_model, err_ulps, interleaved, iv, machine
from torch import nn  # noqa: E402

MIN_SPEEDUP = 1.5  # tracevene's throughput at least 1.5x pyvene's ...
MAX_MEMORY_RATIO = 1.0  # ... at no more memory
LR = 1e-3

TV_LOW, TV_CAYLEY, TV_MEXP = (
    "tracevene | low-rank",
    "tracevene | full, cayley",
    "tracevene | full, matrix_exp",
)
PV_LOW, PV_FULL = "pyvene | low-rank", "pyvene | full"
VARIANTS = (TV_LOW, TV_CAYLEY, TV_MEXP, PV_LOW, PV_FULL)
PEER = {TV_LOW: PV_LOW, TV_CAYLEY: PV_FULL, TV_MEXP: PV_FULL}  # tracevene -> pyvene
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1  # glibc mallopt parameters


# -- data ----------------------------------------------------------------------------
def make_data(size: dict[str, int], steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches: base and source ids, random counterfactual labels (seeded)."""
    gen = torch.Generator().manual_seed(1)
    shape = (size["batch"], size["seq"])
    return [
        {
            "base": torch.randint(0, size["vocab"], shape, generator=gen),
            "source": torch.randint(0, size["vocab"], shape, generator=gen),
            "labels": torch.randint(0, size["vocab"], (size["batch"],), generator=gen),
        }
        for _ in range(steps)
    ]


def das_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the labels at the last position (what ``iv.train`` uses)."""
    return F.cross_entropy(logits[:, -1].float(), labels)


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class StepClock:
    """The batches of a training run; reads both clocks whenever the trainer takes one."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.marks: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            self.marks.append(now())
            yield batch

    def split(self, end: tuple[float, float]) -> dict[str, tuple[float, float]]:
        """Seconds (wall, CPU) of the first epoch's steps and of the later ones."""
        marks, n = [*self.marks, end], len(self.batches)
        cut = marks[n]
        return {
            "first_epoch": (cut[0] - marks[0][0], cut[1] - marks[0][1]),
            "later_epochs": (end[0] - cut[0], end[1] - cut[1]),
        }


# -- tracevene -----------------------------------------------------------------------
class TraceveneDAS:
    """One intervention at ``layer[L].resid_post[:, -1]``, trained by ``iv.train``."""

    def __init__(self, model: iv.Model, layer: int, rot: nn.Module):
        self.model, self.rot = model, rot
        with iv.trace(model) as t:
            src = t.source()
            site = t.layer[layer].resid_post
            site[:, -1] = rot(site[:, -1], src.layer[layer].resid_post[:, -1])
        self.program = t.program

    def train(self, data: Any, epochs: int) -> list[float]:
        history = iv.train(self.program, self.model, data, epochs=epochs, lr=LR, progress=False)
        return history.loss

    def loss(self, batch: dict) -> float:
        with torch.no_grad():
            result = self.program.run(self.model, batch["base"], [batch["source"]])
            return das_loss(result.output.logits, batch["labels"]).item()


def tracevene_rotation(variant: str, d: int, k: int) -> nn.Module:
    if variant == TV_LOW:
        return iv.LowRankRotatedSpace(d, k)
    return iv.RotatedSpace(d, k, orthogonal_map="cayley" if variant == TV_CAYLEY else "matrix_exp")


# -- pyvene --------------------------------------------------------------------------
class PyveneDAS:
    """The same intervention in pyvene, trained with its tutorials' loop."""

    def __init__(self, hf: nn.Module, layer: int, variant: str, k: int, position: int):
        import pyvene as pv

        low = variant == PV_LOW
        rep = pv.RepresentationConfig(
            layer, "block_output", "pos", 1, low_rank_dimension=k if low else None
        )
        kind = pv.LowRankRotatedSpaceIntervention if low else pv.RotatedSpaceIntervention
        config = pv.IntervenableConfig(representations=[rep], intervention_types=kind)
        self.pvm = pv.IntervenableModel(config, model=hf)
        self.pvm.disable_model_gradients()
        self.intervention = next(iter(self.pvm.interventions.values()))
        if not low:
            self.intervention.set_interchange_dim(k)
        self.position = position

    def logits(self, batch: dict) -> torch.Tensor:
        _, out = self.pvm(
            {"input_ids": batch["base"], "use_cache": False},
            [{"input_ids": batch["source"], "use_cache": False}],
            {"sources->base": self.position},
        )
        return out.logits

    def train(self, data: Any, epochs: int) -> list[float]:
        opt = torch.optim.Adam(self.pvm.get_trainable_parameters(), lr=LR)
        losses = []
        for _ in range(epochs):
            for batch in data:
                loss = das_loss(self.logits(batch), batch["labels"])
                loss.backward()
                opt.step()
                self.pvm.set_zero_grad()
                losses.append(loss.item())
        return losses

    def loss(self, batch: dict) -> float:
        with torch.no_grad():
            return das_loss(self.logits(batch), batch["labels"]).item()


def copy_rotation(pv: PyveneDAS, rot: nn.Module) -> None:
    """Start tracevene's intervention from pyvene's initial rotation."""
    layer = pv.intervention.rotate_layer
    with torch.no_grad():
        if isinstance(rot, iv.LowRankRotatedSpace):  # QR of an orthonormal basis is itself
            rot.rotation.parametrizations.weight.original.copy_(layer.weight)
        else:  # both are start @ map(A - A^T) with A = 0: copy the start
            rot.rotation.parametrizations.weight[0].start.copy_(
                layer.parametrizations.weight[0].base
            )
            rot.rotation.parametrizations.weight.original.zero_()


def skew_norm(rot: nn.Module) -> float:
    """The 1-norm of ``A - A^T`` of a full rotation: what sets the cost of ``matrix_exp``."""
    a = rot.rotation.parametrizations.weight.original.detach().float().tril(-1)
    return float(torch.linalg.matrix_norm(a - a.T, ord=1))


# -- the trainers ----------------------------------------------------------------------
def frozen_model(size: dict) -> nn.Module:
    hf = build_model(size)
    hf.requires_grad_(False)
    return hf


def make_trainers(hf: nn.Module, size: dict, k: int, backend: str) -> dict[str, Any]:
    """All five variants on the same model, each pair starting from the same rotation."""
    layer, d = size["n_layer"] // 2, size["n_embd"]
    model = iv.wrap(hf, backend=backend)
    trainers: dict[str, Any] = {
        v: PyveneDAS(hf, layer, v, k, size["seq"] - 1) for v in (PV_LOW, PV_FULL)
    }
    for v in (TV_LOW, TV_CAYLEY, TV_MEXP):
        rot = tracevene_rotation(v, d, k)
        copy_rotation(trainers[PEER[v]], rot)
        trainers[v] = TraceveneDAS(model, layer, rot)
    return {v: trainers[v] for v in VARIANTS}


def make_one(hf: nn.Module, model: iv.Model | None, size: dict, k: int, variant: str) -> Any:
    """One variant (``model``: the wrapped ``hf``, for tracevene)."""
    layer = size["n_layer"] // 2
    if model is None:
        return PyveneDAS(hf, layer, variant, k, size["seq"] - 1)
    return TraceveneDAS(model, layer, tracevene_rotation(variant, size["n_embd"], k))


# -- memory: each variant in a child process ---------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the peak resident size (VmHWM) to the current one; return that (kB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def warm_up_process(hf: nn.Module, ids: torch.Tensor) -> None:
    """One forward and backward of the bare model, before the baseline is taken.

    Brings in what any training needs whichever library runs it (the code pages of the
    forward and backward kernels, BLAS and thread-pool buffers), so that the peak
    measures the memory of the training itself.
    """
    embeds = hf.get_input_embeddings()(ids).detach().requires_grad_()
    out = hf(inputs_embeds=embeds, use_cache=False)
    out.logits[:, -1].float().logsumexp(-1).sum().backward()
    del embeds, out
    gc.collect()


def _child(variant: str, size: dict, k: int, backend: str, steps: int, epochs: int) -> dict:
    libc = ctypes.CDLL("libc.so.6")  # blocks of 64 KiB and up mmapped, unmapped when freed
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    hf = frozen_model(size)
    data = make_data(size, steps)
    pyvene = variant in PEER.values()
    model = None if pyvene else iv.wrap(hf, backend=backend)  # part of loading the model
    warm_up_process(hf, data[0]["base"])
    rss0 = _reset_peak()
    make_one(hf, model, size, k, variant).train(data, epochs)
    peak = _status_kb("VmHWM")
    return {
        "rss_before_mib": rss0 / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_increase_mib": (peak - rss0) / 1024,
    }


def measure_memory(size: dict, k: int, backend: str, steps: int, epochs: int) -> dict:
    """Peak RSS increase of each variant's training run, each in a forked child."""
    if not hasattr(os, "fork") or not Path("/proc/self/clear_refs").exists():
        return {}
    return {v: _forked(_child, v, size, k, backend, steps, epochs) for v in VARIANTS}


def _forked(fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)`` in a forked child; its JSON result comes back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        code = 0
        try:
            payload = json.dumps(fn(*args))
        except BaseException:  # noqa: BLE001 - report anything to the parent
            payload, code = json.dumps({"error": traceback.format_exc()}), 1
        with os.fdopen(write, "w") as f:
            f.write(payload)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    result = json.loads(text) if text else {"error": "the child died without a result"}
    if "error" in result:
        raise RuntimeError(f"memory measurement of {args[0]} failed:\n{result['error']}")
    return result


# -- the benchmark -------------------------------------------------------------------
def run(quick: bool, k: int, steps: int, epochs: int, repeats: int, backend: str,
        memory: bool) -> dict:  # fmt: skip
    """Measure everything; returns the figures (as written by ``--json``)."""
    size = QUICK if quick else FULL
    info = machine(("pyvene",))
    import pyvene  # noqa: F401 - imported before forking, so children share it

    # Memory first: the children fork from a process that has computed nothing yet.
    mem = measure_memory(size, k, backend, steps, epochs) if memory else {}
    hf = frozen_model(size)
    data = make_data(size, steps)
    trainers = make_trainers(hf, size, k, backend)
    init_loss = {v: trainers[v].loss(data[0]) for v in VARIANTS}
    norms = {"start": skew_norm(trainers[TV_MEXP].rot)}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    parts: dict[str, list[dict]] = {v: [] for v in VARIANTS}

    def call(v: str) -> Callable[[], None]:
        def train() -> None:
            clock = StepClock(data)
            losses[v].extend(trainers[v].train(clock, epochs))
            parts[v].append(clock.split(now()))

        return train

    samples = interleaved({v: call(v) for v in VARIANTS}, repeats, 1, "cpu")
    norms["end"] = skew_norm(trainers[TV_MEXP].rot)
    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    config = {
        **size, "layer": size["n_layer"] // 2, "position": size["seq"] - 1, "k": k,
        "steps_per_epoch": steps, "epochs": epochs, "repeats": repeats, "warmup_runs": 1,
        "lr": LR, "backend": backend, "device": "cpu", "dtype": "float32", "quick": quick,
        "attn_implementation": hf.config._attn_implementation,
    }  # fmt: skip
    return {
        "config": config,
        "machine": info,
        "checks": checks(init_loss, losses),
        "matrix_exp_skew_norm": norms,
        **{c: summarise(samples[c], parts, i, config) for i, c in enumerate(CLOCKS)},
        "memory": summarise_memory(mem),
        "losses": losses,
    }


def checks(init_loss: dict[str, float], losses: dict[str, list[float]]) -> dict[str, Any]:
    """Same rotation, same numbers: first-batch losses of each pair, and the matrix_exp run."""
    same = [abs(a - b) for a, b in zip(losses[TV_MEXP], losses[PV_FULL], strict=True)]
    return {
        "init_loss": init_loss,
        "init_loss_abs_diff": {
            f"{t} vs {p}": abs(init_loss[t] - init_loss[p]) for t, p in PEER.items()
        },
        "matrix_exp_pair_max_loss_diff_over_run": max(same),
        "matrix_exp_pair_loss_diff_by_step": same,
        "steps_compared": len(same),
        "init_loss_err_ulps": {
            f"{t} vs {p}": err_ulps(init_loss[t], init_loss[p]) for t, p in PEER.items()
        },
        "matrix_exp_pair_max_loss_err_ulps": max(
            err_ulps(a, b) for a, b in zip(losses[TV_MEXP], losses[PV_FULL], strict=True)
        ),
    }


def summarise(runs: dict[str, list[float]], parts: dict, clock: int, config: dict) -> dict:
    """Per part of the run (first epoch, later epochs, whole run): medians and ratios."""
    warm, steps, epochs = config["warmup_runs"], config["steps_per_epoch"], config["epochs"]
    samples = {
        "first_epoch": {v: [p["first_epoch"][clock] for p in parts[v][warm:]] for v in runs},
        "later_epochs": {v: [p["later_epochs"][clock] for p in parts[v][warm:]] for v in runs},
        "whole_run": runs,
    }
    n_steps = {
        "first_epoch": steps,
        "later_epochs": steps * (epochs - 1),
        "whole_run": steps * epochs,
    }
    out: dict[str, Any] = {"samples_s": samples}
    for part, s in samples.items():
        if n_steps[part] == 0:
            continue
        med = {v: statistics.median(x) for v, x in s.items()}
        out[part] = {
            "ms_per_step": {v: m * 1e3 / n_steps[part] for v, m in med.items()},
            "examples_per_s": {v: config["batch"] * n_steps[part] / m for v, m in med.items()},
            "speedup_vs_pyvene": {t: _paired(s[t], s[p]) for t, p in PEER.items()},
            "ratio_of_medians": {t: med[p] / med[t] for t, p in PEER.items()},
        }
    return out


def _paired(mine: list[float], peer: list[float]) -> float:
    """Median over the repeats of peer time / my time (a throughput ratio)."""
    return statistics.median(b / a for a, b in zip(mine, peer, strict=True))


def summarise_memory(mem: dict) -> dict[str, Any]:
    if not mem:
        return {}
    ratio = {t: mem[t]["peak_increase_mib"] / mem[p]["peak_increase_mib"] for t, p in PEER.items()}
    return {"per_variant": mem, "ratio_vs_pyvene": ratio}


def targets(fig: dict) -> dict[str, bool]:
    out = {}
    for t in PEER:
        out[f"{t}: >= {MIN_SPEEDUP}x pyvene's throughput (whole run, wall)"] = (
            fig["wall"]["whole_run"]["speedup_vs_pyvene"][t] >= MIN_SPEEDUP
        )
        if fig["memory"]:
            out[f"{t}: <= pyvene's peak memory"] = (
                fig["memory"]["ratio_vs_pyvene"][t] <= MAX_MEMORY_RATIO
            )
    return out


# -- the report --------------------------------------------------------------------------
def table(fig: dict) -> str:
    """The figures as a Markdown table (also printed)."""
    w, c, mem = fig["wall"], fig["cpu"], fig["memory"]
    later = "later_epochs" in w
    lines = [
        "| library | variant | ms / step, epoch 1 | ms / step, later epochs | examples / s "
        "| x pyvene, epoch 1 | x pyvene, later epochs | x pyvene, whole run | x pyvene, "
        "whole run (CPU) | peak MiB | x pyvene |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        cells = v.split(" | ") + [
            f"{w['first_epoch']['ms_per_step'][v]:.1f}",
            f"{w['later_epochs']['ms_per_step'][v]:.1f}" if later else "",
            f"{w['whole_run']['examples_per_s'][v]:.2f}",
            _ratio(w["first_epoch"]["speedup_vs_pyvene"], v),
            _ratio(w["later_epochs"]["speedup_vs_pyvene"], v) if later else "",
            _ratio(w["whole_run"]["speedup_vs_pyvene"], v),
            _ratio(c["whole_run"]["speedup_vs_pyvene"], v),
            f"{mem['per_variant'][v]['peak_increase_mib']:.1f}" if mem else "n/a",
            _ratio(mem["ratio_vs_pyvene"], v) if mem else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(d: dict, name: str) -> str:
    return f"{d[name]:.2f}" if name in d else ""


def report(fig: dict) -> str:
    """Everything a reader needs: the machine, the setup, the checks, the table."""
    m, c, ch = fig["machine"], fig["config"], fig["checks"]
    load = lambda x: ", ".join(f"{v:.2f}" for v in x) if x else "n/a"  # noqa: E731
    norms = fig["matrix_exp_skew_norm"]
    head = [
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']} "
        f"({m['torch_threads']} threads{', the default' * m['default_threads']}), "
        f"transformers {m['transformers']}, pyvene {m['pyvene']}, Python {m['python']}",
        f"load average: {load(m['load_average_at_start'])} at start, "
        f"{load(m['load_average_at_end'])} at end",
        f"model: random GPT-2, {c['n_layer']} layers, d_model {c['n_embd']}, {c['n_head']} "
        f"heads, vocab {c['vocab']}, {c['dtype']}, attention {c['attn_implementation']}, "
        f"on {c['device']}, weights frozen; batch {c['batch']} x {c['seq']} tokens",
        f"task: DAS at layer[{c['layer']}].resid_post (pyvene: block_output {c['layer']}), "
        f"position {c['position']}, k = {c['k']} interchanged dims, one source; loss "
        f"cross-entropy of random labels at the last position; Adam lr {c['lr']}; "
        f"a training run = {c['epochs']} epoch(s) of {c['steps_per_epoch']} batches; "
        f"tracevene backend {c['backend']!r}",
        f"timing: {c['warmup_runs']} warm-up run and {c['repeats']} interleaved repeats of "
        "a training run per variant; medians; 'x pyvene' = median of per-repeat pyvene "
        "time / tracevene time (throughput ratio, > 1: tracevene faster); wall "
        "(time.perf_counter) unless marked CPU (time.process_time)"
        + ("  [QUICK SMOKE RUN]" * c["quick"]),
        "memory: peak RSS during a training run minus RSS before it (VmHWM reset through "
        "/proc/self/clear_refs after loading the model and one bare forward + backward; "
        "mallopt(M_MMAP_THRESHOLD, 64 KiB), so freed tensors leave the RSS at once), each "
        "variant in its own forked child; 'x pyvene' = tracevene / pyvene (< 1: less)",
        "same rotation, first-batch loss |difference|: "
        + ", ".join(f"{k} {v:.1e}" for k, v in ch["init_loss_abs_diff"].items())
        + "; matrix_exp pair, training loss |difference|: step 1 "
        f"{ch['matrix_exp_pair_loss_diff_by_step'][0]:.1e}, max over all "
        f"{ch['steps_compared']} steps {ch['matrix_exp_pair_max_loss_diff_over_run']:.1e}",
        f"matrix_exp: ||A - A^T||_1 = {norms['start']:.3g} before the warm-up, "
        f"{norms['end']:.3g} at the end",
        "",
        table(fig),
        "",
        "targets: "
        + "; ".join(f"{k}: {'PASS' if ok else 'FAIL'}" for k, ok in fig["targets"].items()),
    ]
    return "\n".join(head)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 repeats (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write the figures to PATH")
    parser.add_argument("--k", type=int, help="interchanged dims (default 16; quick: 4)")
    parser.add_argument("--steps", type=int, help="batches per epoch (default 3; quick: 2)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per training run (2)")
    parser.add_argument("--repeats", type=int, help="timed repeats per variant (default 7)")
    parser.add_argument("--backend", default="torch", help="tracevene backend (default torch)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory children")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.k or (4 if args.quick else 16)
    steps = args.steps or (2 if args.quick else 3)
    repeats = args.repeats or (2 if args.quick else 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # engines' deprecation chatter, not figures
        fig = run(args.quick, k, steps, args.epochs, repeats, args.backend, not args.no_memory)
    fig["targets"] = targets(fig)
    print(report(fig))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    return 1 if args.strict and not all(fig["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
