"""Scheduling a program onto forward passes (shared by every backend).

A *pass* is one forward call of the model over one or more runs (batched along the
batch axis). Each read and write happens at an *event*: a hook point in one pass.
Other nodes run at the event of their latest input, or before the first pass.

A program run again on the same model reuses its plan (``PlanCache``): a plan depends
only on the program's nodes, the bindings of its sites, the schedule and whether the
runs can share a pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ScheduleError
from ..ir.nodes import Node
from ..ir.program import Program, run_name
from ..sites.arch import Point
from ..sites.bind import Binding
from ..sites.vocab import display

PRELUDE = (-1, ())


@dataclass
class Pass:
    """One forward call.

    Attributes:
        runs: Runs batched in this pass (0 is the base).
        events: Hook point -> nodes to execute when it fires, in program order.
        order: Hook point -> its place in forward order.
        bindings: Site name -> its binding, for the reads and writes of this pass.
        captures: Hook points whose tensors the views of those sites need.
        points: Every hook point the pass hooks (events and captures).
    """

    runs: list[int]
    events: dict[Point, list[Node]] = field(default_factory=dict)
    order: dict[Point, tuple[int, ...]] = field(default_factory=dict)
    bindings: dict[str, Binding] = field(default_factory=dict)
    captures: frozenset[Point] = frozenset()
    points: frozenset[Point] = frozenset()

    def seal(self) -> None:
        """Derive ``captures`` and ``points`` once the events and bindings are in place."""
        self.captures = frozenset(c for b in self.bindings.values() for c in b.captures)
        self.points = frozenset(self.events) | self.captures


@dataclass
class Plan:
    """Where every node of a program executes.

    Attributes:
        passes: Forward passes in execution order.
        prelude: Nodes that need no site (constants, placeholders, ...), run first.
        mode: ``"batched"`` or ``"sequential"`` (what was asked for after ``"auto"``).
        nodes: The nodes of the program the plan was made for.
        saves: Its save nodes, in program order.
        bound: ``(site, binding)`` of every read and write, to check the plan against.
    """

    passes: list[Pass]
    prelude: list[Node]
    mode: str
    nodes: tuple[Node, ...] = ()
    saves: list[Node] = field(default_factory=list)
    bound: tuple[tuple[str, Binding], ...] = ()

    def describe(self) -> str:
        """One line per pass, e.g. ``pass 1: base+src1 (batched, 3 hook points)``."""
        return "\n".join(
            f"pass {i + 1}: {'+'.join(run_name(r) for r in p.runs)} "
            f"({self.mode}, {len(p.events)} hook point{'s' * (len(p.events) != 1)})"
            for i, p in enumerate(self.passes)
        )

    def current(self, bind: Bind) -> bool:
        """Whether every site still binds to the binding this plan was made with."""
        for site, binding in self.bound:
            if bind(site) is not binding:
                return False
        return True


#: ``(site name) -> its binding`` (where it is hooked, its place in forward order)
Bind = Callable[[str], Binding]


class PlanCache:
    """The plans of the programs run on one model, reused by later runs of each program.

    A plan is kept per program (weakly: it goes when the program does) and per
    ``(mode, can_batch)``, and reused while the program holds the same nodes and each
    of its sites binds to the same ``Binding`` (a resolver that re-binds its sites, or
    another model, misses). Shapes, placeholders, gradient mode and weights are not
    part of a plan, and are read afresh by every run.

    Attributes:
        hits: Runs that reused a plan.
        misses: Runs that made one.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, dict[tuple[str, bool], Plan]]] = {}
        self.hits = 0
        self.misses = 0

    def plan(self, program: Program, bind: Bind, mode: str, can_batch: bool) -> Plan:
        """``make_plan(program, bind, mode, can_batch)``, or the plan made for it before.

        Raises:
            ScheduleError: As ``make_plan``; nothing is kept for a program that raised.
        """
        plans = self._plans(program)
        plan = plans.get((mode, can_batch))
        if plan is not None and plan.nodes is program.nodes and plan.current(bind):
            self.hits += 1
            return plan
        self.misses += 1
        plan = plans[(mode, can_batch)] = make_plan(program, bind, mode, can_batch)
        return plan

    def _plans(self, program: Program) -> dict[tuple[str, bool], Plan]:
        """The plans kept for ``program`` (a new, empty dict the first time)."""
        key = id(program)
        entry = self.entries.get(key)
        if entry is None or entry[0]() is not program:
            entry = self.entries[key] = (weakref.ref(program, self._forget(key)), {})
        return entry[1]

    def _forget(self, key: int) -> Callable[[weakref.ref], None]:
        def drop(ref: weakref.ref) -> None:
            if self.entries.get(key, (None,))[0] is ref:
                del self.entries[key]

        return drop


def make_plan(program: Program, bind: Bind, mode: str, can_batch: bool) -> Plan:
    """Schedule ``program``.

    Args:
        program: The program.
        bind: The binding of a site: where it is hooked, its place in forward order.
        mode: ``"batched"`` (fewest passes) or ``"sequential"`` (a pass per group of
            runs that must share one).
        can_batch: Whether runs may share a pass at all (compatible inputs).

    Raises:
        ScheduleError: A value cannot exist when it is needed.
    """
    nodes = program.nodes
    feeds = _feeding_reads(nodes)
    used = {0} | {n.run_index for n in nodes if n.op in ("read", "write")}
    edges: dict[tuple[int, int], tuple[Node, Node] | None] = {}  # (r_from, r_to) -> strict?
    for w in (n for n in nodes if n.op == "write"):
        kw = bind(w.key).order
        for r in feeds[w.id]:
            read = nodes[r]
            kr = bind(read.key).order
            if read.run_index == w.run_index:
                if kr > kw:
                    raise ScheduleError(_late_message(read, w, "its own"))
                continue
            strict = (read, w) if kr > kw else None
            edge = (read.run_index, w.run_index)
            edges[edge] = edges.get(edge) or strict
    groups = _components(sorted(used), edges)
    for group in groups:
        for (a, b), strict in edges.items():
            if strict and a in group and b in group:
                raise ScheduleError(_cycle_message(*strict))
    if len(groups) < len(used) and not can_batch:
        raise ScheduleError(
            "runs that feed each other at the same layer must share one forward pass, but "
            "their inputs cannot be batched (different shapes, or a model without a site "
            "table): give them inputs of the same shape."
        )
    layers = _layer(groups, edges, mode == "batched" and can_batch)
    return _assign(program, layers, bind, mode if can_batch else "sequential")


def _feeding_reads(nodes: tuple[Node, ...]) -> list[set[int]]:
    """For each node, the read nodes its value depends on."""
    feeds: list[set[int]] = []
    for n in nodes:
        s: set[int] = set()
        for r in n.refs():
            s |= feeds[r] | ({r} if nodes[r].op == "read" else set())
        feeds.append(s)
    return feeds


def _components(runs: list[int], edges: dict) -> list[list[int]]:
    """Strongly connected components of the run graph, in topological order."""
    succ = {r: [b for (a, b) in edges if a == r] for r in runs}
    reach = {r: _reachable(r, succ) for r in runs}
    groups: list[list[int]] = []
    for r in runs:
        if not any(r in g for g in groups):
            groups.append([s for s in runs if s in reach[r] and r in reach[s]])
    order: list[list[int]] = []
    while groups:  # Kahn's algorithm; ties keep run order
        for g in groups:
            if not any(a in h and b in g for (a, b) in edges for h in groups if h is not g):
                order.append(g)
                groups.remove(g)
                break
    return order


def _reachable(r: int, succ: dict[int, list[int]]) -> set[int]:
    seen, todo = {r}, [r]
    while todo:
        for s in succ[todo.pop()]:
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def _layer(groups: list[list[int]], edges: dict, batch: bool) -> list[list[int]]:
    """Group the run components into passes."""
    if not batch:
        return groups
    level: dict[int, int] = {}
    for g in groups:  # topological order: predecessors are placed already
        lv = 0
        for (a, b), strict in edges.items():
            if b in g and a not in g:
                lv = max(lv, level[a] + (1 if strict else 0))
        level.update({r: lv for r in g})
    return [sorted(r for r in level if level[r] == i) for i in range(max(level.values()) + 1)]


def _assign(program: Program, layers, bind: Bind, mode: str) -> Plan:
    pass_of = {r: i for i, runs in enumerate(layers) for r in runs}
    passes = [Pass(runs) for runs in layers]
    when: dict[int, tuple] = {}
    prelude: list[Node] = []
    for n in program.nodes:
        if n.op in ("read", "write"):
            b = bind(n.key)
            when[n.id] = (pass_of[n.run_index], b.order, b.point)
            passes[pass_of[n.run_index]].bindings[n.key] = b
        else:
            when[n.id] = max((when[r] for r in n.refs()), default=PRELUDE, key=lambda w: w[:2])
        if when[n.id] == PRELUDE:
            prelude.append(n)
            continue
        p, key, point = when[n.id]
        passes[p].events.setdefault(point, []).append(n)
        passes[p].order[point] = key
    for p in passes:
        p.seal()
    saves = [n for n in program.nodes if n.op == "save"]
    bound = tuple((s, b) for p in passes for s, b in p.bindings.items())
    return Plan(passes, prelude, mode, program.nodes, saves, bound)


def _late_message(read: Node, write: Node, whose: str) -> str:
    return (
        f"{run_name(write.run_index)}.{display(write.key)} (line {write.loc}) is written from "
        f"{run_name(read.run_index)}.{display(read.key)} (line {read.loc}), a later site of "
        f"{whose} run: that value does not exist yet when the write happens. Read it from "
        "a source run instead (t.source(inputs))."
    )


def _cycle_message(read: Node, write: Node) -> str:
    src, dst = run_name(read.run_index), run_name(write.run_index)
    return (
        f"runs {src} and {dst} each need a later site of the other: "
        f"{dst}.{display(write.key)} (line {write.loc}) is written from "
        f"{src}.{display(read.key)} (line {read.loc}), while {src} also depends on "
        f"{dst}. Split the program, or feed one of them from an extra source run."
    )
