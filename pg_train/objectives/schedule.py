"""Schedules of the two-stream objective (issue 26): `[[from_step, value], ...]`, piecewise
constant, the value of the last entry whose step is <= the optimizer step. `[[0, 1.0]]` is a
constant; `[[0, 1.0], [675, 0.0]]` switches at step 675 (the curriculum's shape)."""

from __future__ import annotations


def schedule_at(points: list[list[float]], step: int) -> float:
    """The schedule's value at optimizer step `step` (0-based); before the first entry, its value."""
    value = points[0][1]
    for start, v in points:
        if step >= start:
            value = v
    return float(value)


def schedule_problem(points: list[list[float]], low: float, high: float) -> str | None:
    """Why `points` is not a schedule of values in [low, high], or None."""
    if not points or any(len(p) != 2 for p in points):
        return "must be a non-empty list of [from_step, value] pairs"
    starts = [p[0] for p in points]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or any(s != int(s) for s in starts):
        return "steps must be whole numbers, start at 0 and increase"
    if not all(low <= p[1] <= high for p in points):
        return f"values must be in [{low}, {high}]"
    return None


def breakpoints(*schedules: list[list[float]]) -> list[int]:
    """Every step at which one of `schedules` changes (and 0): where their values combine differently."""
    return sorted({int(p[0]) for s in schedules for p in s} | {0})


def first_rise(points: list[list[float]]) -> int | None:
    """The first step at which a schedule that is 0 at step 0 turns > 0 (where a stage begins:
    the curriculum's switch), or None when it starts > 0 or never rises."""
    if schedule_at(points, 0) > 0:
        return None
    return next((int(start) for start, value in points if value > 0), None)
