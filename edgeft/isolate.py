"""Run one memory-heavy step in a process of its own.

Measuring an exported file means loading it in its runtime, and a runtime holds the whole
file (llama.cpp maps it): 3.6 GB for a 1.7B model in F16. Run in the exporting process, that
would set the export's peak memory however carefully the rest streams. In a child process it
is released when the child ends, its peak is measured on its own (what running the file
costs, worth recording), and a runtime that crashes on a bad file fails the step with a
message instead of killing the export.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Callable
from typing import Any

from edgeft.errors import EdgeftError


def peak_rss_mb() -> int | None:
    """This process's peak resident memory so far, in MB (None where unknown).

    Linux's high-water mark of this process's own memory (``VmHWM``): ``ru_maxrss`` would
    also count the parent's peak at the moment this process was started.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10))


def _call(function: Callable, args: tuple, kwargs: dict) -> tuple[Any, int | None]:
    return function(*args, **kwargs), peak_rss_mb()


def in_child(function: Callable, *args, what: str, **kwargs) -> tuple[Any, int | None]:
    """``function(*args, **kwargs)`` in a fresh (spawned) process.

    Arguments and result travel between this process and its own child (plain data: paths,
    arrays, dataclasses); exceptions raised in the child are raised here.

    Args:
        what: what the step does, for the message if the child dies.

    Returns:
        ``(result, the child's peak RSS in MB)``.

    Raises:
        EdgeftError: the child died (a crash in native code, or killed for memory).
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(_call, function, args, kwargs).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise EdgeftError(
                f"{what}: the process died (a crash in the runtime, or out of memory)"
            ) from exc
