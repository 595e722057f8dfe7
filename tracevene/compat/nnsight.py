"""The one seam between tracevene and nnsight's private internals.

Written against nnsight 0.8.1 (``WRITTEN_FOR``). Everything tracevene touches that
nnsight does not document -- the controller and state it puts in a module's
``__dict__`` (``STATE``, ``Controller``, ``State``, ``module_body``), a state's
``routes``, the interleaver's ``envoys``, ``counts`` and ``interleaving`` flag --
is used here and nowhere else, so a new nnsight release is ported in this file.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

#: the nnsight release this module is written against
WRITTEN_FOR = "0.8.1"

__all__ = ["WRITTEN_FOR", "EarlyStopException", "OutOfOrderError", "PrivateEnvoy"]


def define_anyio_classes_first() -> None:
    """Import anyio's ``TypedAttributeSet`` subclasses before nnsight.

    Importing nnsight 0.8.1 mounts ``.save`` on every object; anyio then rejects any
    ``TypedAttributeSet`` subclass defined afterwards ("Attribute 'save' is missing
    its type annotation"). nnsight pre-imports ``anyio``, but anyio 4.x loads those
    modules lazily, so a later ``httpx`` / ``anyio`` user would crash.
    """
    if "nnsight" in sys.modules:
        return
    for name in ("anyio.abc._sockets", "anyio.streams.file", "anyio.streams.tls"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


define_anyio_classes_first()

import nnsight  # noqa: E402
from nnsight.intervention.interleaver import EarlyStopException, OutOfOrderError  # noqa: E402
from nnsight.intervention.source import STATE, Controller, State, module_body  # noqa: E402

_MISSING = object()


define_anyio_classes_first()


_MISSING = object()


class PrivateEnvoy:
    """A private ``nnsight.NNsight`` envoy whose controllers are on the module only in use.

    nnsight routes a module through an envoy by a controller in the module's
    ``__dict__`` (``forward`` plus ``__nnsight__`` state). A pass attaches controllers
    to the modules it visits and takes them off afterwards; every other module runs on
    PyTorch's plain path. A module that already carries another nnsight envoy's
    controller (the caller wrapped the model with nnsight too) gets our route added to
    its state instead, and removed again after.

    Attributes:
        module: The caller's module.
        envoy: The root envoy.
        interleaver: The envoy tree's interleaver.
        envoys: Module path (as in ``named_modules``) -> its envoy.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.modules = dict(module.named_modules())
        before = {path: dict(vars(m)) for path, m in self.modules.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BERT's `output` submodules are renamed E_output
            self.envoy = nnsight.NNsight(module)
        self.interleaver = self.envoy.interleaver
        self.envoys = {path: self.interleaver.envoys[id(m)] for path, m in self.modules.items()}
        # id(module) -> (the instance forward it wraps, controller, state)
        self._controllers: dict[int, tuple[Any, Any, Any]] = {}
        for path, m in self.modules.items():  # take off what NNsight() put on
            d, old = vars(m), before[path]
            for key in ("forward", STATE):
                if key in old:
                    d[key] = old[key]
                else:
                    d.pop(key, None)
            if STATE in old:
                self._unroute(old[STATE])

    @contextlib.contextmanager
    def attached(self, paths: set[str]) -> Iterator[None]:
        """Route the modules at ``paths`` through our interleaver for the block."""
        undo = []
        try:
            for path in paths:
                undo.append(self._attach(path, self.modules[path]))
            yield
        finally:
            for m, state, forward in reversed(undo):
                if m is None:
                    continue
                if state is not None:
                    self._unroute(state)
                    continue
                d = vars(m)
                d.pop(STATE, None)
                d.pop("forward", None)
                if forward is not _MISSING:
                    d["forward"] = forward

    def _attach(self, path: str, m: nn.Module) -> tuple[Any, Any, Any]:
        d = vars(m)
        state = d.get(STATE)
        cached = self._controllers.get(id(m))
        if state is not None:
            if cached is not None and state is cached[2]:
                return None, None, None  # attached already (a nested run)
            state.register(self.interleaver, self.envoys[path].path)
            return m, state, None
        forward = d.get("forward", _MISSING)
        if cached is None or cached[0] is not forward:
            state = State(module_body(m))
            state.register(self.interleaver, self.envoys[path].path)
            cached = self._controllers[id(m)] = (forward, Controller(m, state), state)
        d["forward"], d[STATE] = cached[1], cached[2]
        return m, None, forward

    def _unroute(self, state: Any) -> None:
        state.routes[:] = [r for r in state.routes if r[0]() is not self.interleaver]

    def location(self, path: str, io: str) -> str:
        """The nnsight location of a module's input or output (``model.h.0.output``)."""
        return f"{self.envoys[path].path}.{io}"

    def calls(self, location: str) -> int:
        """How many times the module at ``location`` has run in this envoy's traces."""
        return self.interleaver.counts.get(location, 0)

    @contextlib.contextmanager
    def stood_down(self) -> Iterator[None]:
        """Run the block with the trace stood down (submodules called plainly)."""
        self.interleaver.interleaving = False
        try:
            yield
        finally:
            self.interleaver.interleaving = True
