"""Defensive readers of a results object (see ``edgeft.bench.schema``).

Every reader returns None (or an empty list) where a level is missing, null or of another type,
so a report of a partial or older results file prints ``-`` instead of failing. The names keep
their underscore: they are helpers of the report modules, not API.
"""

from __future__ import annotations

import math
from typing import Any


def _get(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, or None where a level is missing or not an object."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    """A number as float; None for null, booleans and anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value: Any) -> float | None:
    x = _num(value)
    return x if x is not None and math.isfinite(x) else None


def _median(stat: Any) -> float | None:
    """The median of a STAT (a bare number is accepted as its own median)."""
    if isinstance(stat, dict):
        return _num(stat.get("median"))
    return _num(stat)


def _ok(artifact: dict) -> bool:
    return artifact.get("status") == "ok"


def _name(artifact: dict) -> str:
    return str(artifact.get("name", "?"))


def _artifacts(results: dict) -> list[dict]:
    artifacts = results.get("artifacts")
    if not isinstance(artifacts, list):
        return []
    return [a for a in artifacts if isinstance(a, dict)]


def _size_mb(artifact: dict) -> float | None:
    size = _num(artifact.get("size_bytes"))
    return None if size is None else size / 1e6


def _decode_entry(artifact: dict, depth: int) -> dict | None:
    entries = _get(artifact, "latency", "decode")
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("depth") == depth:
            return entry
    return None


def _decode_tok_s(artifact: dict, depth: int) -> float | None:
    return _median(_get(_decode_entry(artifact, depth), "tok_s"))


def _vs(artifact: dict, reference: str | None, key: str) -> float | None:
    if reference is None:
        return None
    return _num(_get(artifact, "accuracy", "vs", reference, key))


def _task_accuracy(artifact: dict) -> float | None:
    return _num(_get(artifact, "accuracy", "task", "accuracy"))


def _depths(results: dict) -> list[int]:
    """The decode depths of the settings and of any artifact, ascending."""
    depths = set()
    configured = _get(results, "settings", "depths")
    if isinstance(configured, list):
        depths.update(d for d in configured if isinstance(d, int) and not isinstance(d, bool))
    for artifact in _artifacts(results):
        entries = _get(artifact, "latency", "decode")
        for entry in entries if isinstance(entries, list) else []:
            depth = _get(entry, "depth")
            if isinstance(depth, int) and not isinstance(depth, bool):
                depths.add(depth)
    return sorted(depths)


def _first_depth(results: dict) -> int:
    """Depth 0 when measured, else the shallowest depth (0 when there are none)."""
    depths = _depths(results)
    return 0 if 0 in depths or not depths else depths[0]


def _references(results: dict) -> list[str]:
    """Reference names: the run's list, else the names the artifacts were compared with."""
    names: list[str] = []
    refs = results.get("references")
    for ref in refs if isinstance(refs, list) else []:
        name = _get(ref, "name")
        if isinstance(name, str) and name not in names:
            names.append(name)
    if names:
        return names
    for artifact in _artifacts(results):
        vs = _get(artifact, "accuracy", "vs")
        for name in vs if isinstance(vs, dict) else []:
            if name not in names:
                names.append(str(name))
    return names


def _has_predictions(results: dict) -> bool:
    for artifact in _artifacts(results):
        entries = _get(artifact, "latency", "decode")
        for entry in entries if isinstance(entries, list) else []:
            if _num(_get(entry, "predicted_tok_s")) is not None:
                return True
    return False
