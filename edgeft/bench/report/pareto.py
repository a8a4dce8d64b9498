"""The Pareto front: the artifacts that no other artifact beats on two figures at once."""

from __future__ import annotations

import math

from edgeft.bench.report.read import (
    _artifacts,
    _decode_tok_s,
    _finite,
    _first_depth,
    _name,
    _ok,
    _references,
    _size_mb,
    _vs,
)


def pareto_front(
    points: list[tuple[str, float, float]], *, minimize_x: bool = True, minimize_y: bool = True
) -> list[str]:
    """Names of the points that no other point dominates.

    A point dominates another when it is at least as good on both coordinates and strictly
    better on one. Tied points (equal on both) do not dominate each other, so all of them stay
    on the front. Points with a NaN or infinite coordinate are never on the front.

    Args:
        points: ``(name, x, y)`` triples.
        minimize_x: smaller x is better (else larger).
        minimize_y: smaller y is better (else larger).

    Returns:
        The names of the front, in the order of ``points``.
    """
    sx = 1.0 if minimize_x else -1.0
    sy = 1.0 if minimize_y else -1.0
    valid = [
        (name, sx * float(x), sy * float(y))
        for name, x, y in points
        if math.isfinite(x) and math.isfinite(y)
    ]

    def dominated(x: float, y: float) -> bool:
        return any(ox <= x and oy <= y and (ox < x or oy < y) for _, ox, oy in valid)

    return [name for name, x, y in valid if not dominated(x, y)]


def _front_points(results: dict) -> tuple[list, list, int, str | None]:
    """The points of both fronts: ``(speed, kl, depth, reference)``.

    ``speed`` holds ``(name, size MB, decode tok/s at depth)`` and ``kl`` holds
    ``(name, size MB, mean KL vs reference)``, for measured artifacts with finite figures only.
    """
    d0 = _first_depth(results)
    refs = _references(results)
    ref = refs[0] if refs else None
    speed, kl = [], []
    for a in _artifacts(results):
        size = _finite(_size_mb(a))
        if not _ok(a) or size is None:
            continue
        tok_s = _finite(_decode_tok_s(a, d0))
        if tok_s is not None:
            speed.append((_name(a), size, tok_s))
        mean_kl = _finite(_vs(a, ref, "mean_kl"))
        if mean_kl is not None:
            kl.append((_name(a), size, mean_kl))
    return speed, kl, d0, ref
