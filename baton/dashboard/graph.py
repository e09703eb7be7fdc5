"""The workflow drawing: steps laid out in columns by dependency depth, for an SVG.

Pure layout, no I/O: a step's column is the length of the longest dependency chain that
leads to it; within a column steps are ordered by the mean row of their dependencies (one
barycentre pass, which keeps most edges short and uncrossed), then by insertion order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

NODE_WIDTH = 170
NODE_HEIGHT = 38
GAP_X = 60
GAP_Y = 16
PAD = 12
LABEL_CHARS = 22
MAX_DRAWN = 400
"""Workflows with more steps than this are listed, not drawn."""


@dataclass(frozen=True)
class StepShape:
    """What the layout needs of a step."""

    name: str
    deps: Sequence[str]
    group_name: str | None = None
    state: str | None = None


@dataclass(frozen=True)
class Node:
    """A step's box."""

    name: str
    label: str
    """The name, shortened to fit the box (the full name goes in its tooltip)."""
    state: str
    x: int
    y: int
    column: int


@dataclass(frozen=True)
class Edge:
    """A dependency: a curve from the dependency's box to its dependent's."""

    source: str
    target: str
    path: str


@dataclass
class Layout:
    """Boxes, curves and the drawing's size."""

    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    width: int = 0
    height: int = 0
    node_width: int = NODE_WIDTH
    node_height: int = NODE_HEIGHT


def _label(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "\u2026"


def expand(steps: Sequence[StepShape]) -> dict[str, list[str]]:
    """Return each step's dependencies as step names (a fan-out group stands for each of
    its copies); names that match no step are dropped."""
    names = {s.name for s in steps}
    groups: dict[str, list[str]] = {}
    for s in steps:
        if s.group_name:
            groups.setdefault(s.group_name, []).append(s.name)
    out: dict[str, list[str]] = {}
    for s in steps:
        seen: dict[str, None] = {}
        for dep in s.deps:
            for name in groups.get(dep, [dep]):
                if name in names and name != s.name:
                    seen[name] = None
        out[s.name] = list(seen)
    return out


def depths(deps: dict[str, list[str]]) -> dict[str, int]:
    """Return each step's column: 0 without dependencies, else one more than the deepest
    of them. A cycle (which a valid workflow never has) is cut where it is met."""
    depth: dict[str, int] = {}
    for start in deps:
        if start in depth:
            continue
        stack: list[tuple[str, bool]] = [(start, False)]
        on_path: set[str] = set()
        while stack:
            name, done = stack.pop()
            if done:
                on_path.discard(name)
                depth[name] = 1 + max((depth.get(d, -1) for d in deps[name]), default=-1)
                continue
            if name in depth or name in on_path:
                continue
            on_path.add(name)
            stack.append((name, True))
            stack.extend((d, False) for d in deps[name] if d not in depth and d not in on_path)
    return depth


def layout(steps: Sequence[StepShape]) -> Layout:
    """Lay ``steps`` out left to right by dependency depth."""
    if not steps:
        return Layout()
    deps = expand(steps)
    depth = depths(deps)
    order = {s.name: i for i, s in enumerate(steps)}
    columns: dict[int, list[str]] = {}
    for s in steps:
        columns.setdefault(depth[s.name], []).append(s.name)
    row: dict[str, float] = {}
    for column in sorted(columns):
        names = columns[column]
        if column > 0:
            def centre(name: str) -> tuple[float, int]:
                parents = [row[d] for d in deps[name] if d in row]
                return (sum(parents) / len(parents) if parents else 0.0, order[name])
            names.sort(key=centre)
        for i, name in enumerate(names):
            row[name] = float(i)
    tallest = max(len(names) for names in columns.values())
    height = PAD * 2 + tallest * NODE_HEIGHT + (tallest - 1) * GAP_Y
    width = PAD * 2 + len(columns) * NODE_WIDTH + (len(columns) - 1) * GAP_X
    state = {s.name: s.state or "unknown" for s in steps}
    at: dict[str, tuple[int, int]] = {}
    out = Layout(width=width, height=height)
    for column in sorted(columns):
        names = columns[column]
        used = len(names) * NODE_HEIGHT + (len(names) - 1) * GAP_Y
        top = PAD + (tallest * NODE_HEIGHT + (tallest - 1) * GAP_Y - used) // 2
        x = PAD + column * (NODE_WIDTH + GAP_X)
        for i, name in enumerate(names):
            y = top + i * (NODE_HEIGHT + GAP_Y)
            at[name] = (x, y)
            out.nodes.append(Node(name, _label(name), state[name], x, y, column))
    for s in steps:
        x2, y2 = at[s.name]
        y2 += NODE_HEIGHT // 2
        for dep in deps[s.name]:
            x1, y1 = at[dep]
            x1 += NODE_WIDTH
            y1 += NODE_HEIGHT // 2
            middle = (x1 + x2) // 2
            out.edges.append(Edge(dep, s.name,
                                  f"M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}"))
    return out
