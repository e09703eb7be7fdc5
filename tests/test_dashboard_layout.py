"""The workflow drawing's layout: pure, no database."""

from __future__ import annotations

from baton.dashboard.graph import (
    GAP_X,
    LABEL_CHARS,
    NODE_WIDTH,
    PAD,
    Layout,
    StepShape,
    depths,
    expand,
    layout,
)


def test_columns_are_dependency_depth() -> None:
    steps = [StepShape("a", []), StepShape("b", ["a"]), StepShape("c", ["a"]),
             StepShape("d", ["b", "c"]), StepShape("e", ["a", "d"])]
    assert depths(expand(steps)) == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 3}
    drawn = layout(steps)
    assert {n.name: n.column for n in drawn.nodes} == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 3}
    assert drawn.width == PAD * 2 + 4 * NODE_WIDTH + 3 * GAP_X
    assert sorted((e.source, e.target) for e in drawn.edges) == [
        ("a", "b"), ("a", "c"), ("a", "e"), ("b", "d"), ("c", "d"), ("d", "e")]
    x = {n.name: n.x for n in drawn.nodes}
    assert x["a"] < x["b"] == x["c"] < x["d"] < x["e"]


def test_a_group_dependency_means_each_copy() -> None:
    steps = [StepShape("root", []),
             StepShape("ask_small", ["root"], group_name="ask"),
             StepShape("ask_large", ["root"], group_name="ask"),
             StepShape("merge", ["ask", "missing", "merge"])]
    assert expand(steps)["merge"] == ["ask_small", "ask_large"]
    assert {(e.source, e.target) for e in layout(steps).edges} >= {
        ("ask_small", "merge"), ("ask_large", "merge")}


def test_rows_follow_their_dependencies() -> None:
    # Column 1 in insertion order is (under_b, under_a); under their parents' rows it is
    # (under_a, under_b), which leaves the two edges uncrossed.
    steps = [StepShape("a", []), StepShape("b", []),
             StepShape("under_b", ["b"]), StepShape("under_a", ["a"])]
    y = {n.name: n.y for n in layout(steps).nodes}
    assert y["a"] < y["b"] and y["under_a"] < y["under_b"]


def test_a_cycle_is_cut_not_looped() -> None:
    steps = [StepShape("a", ["c"]), StepShape("b", ["a"]), StepShape("c", ["b"])]
    found = depths(expand(steps))
    assert set(found) == {"a", "b", "c"}
    assert len(layout(steps).nodes) == 3


def test_long_names_are_shortened_in_the_box_only() -> None:
    name = "x" * 60
    node = layout([StepShape(name, [], state=None)]).nodes[0]
    assert node.name == name and len(node.label) == LABEL_CHARS
    assert node.label.endswith("\u2026") and node.state == "unknown"
    assert layout([]) == Layout()
