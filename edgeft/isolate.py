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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (10**6 bytes; None where unknown).

    Linux's ``VmHWM`` belongs to the address space, which exec replaces; ``ru_maxrss``
    survives exec and so starts at the parent's size when it started this process.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def free_memory() -> None:
    """Collect unreachable objects now, then :func:`trim_memory`: a transformers model holds
    reference cycles, so a dropped one stays in memory (5 GB for a 1.2B model in fp32) until
    the cycle collector happens to run."""
    import gc

    gc.collect()
    trim_memory()


def trim_memory() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    glibc raises its mmap threshold each time a large block is freed, so later large arrays
    come from the heap, whose freed pages stay in the process: a loop that allocates and frees
    a layer's arrays would creep upward by tens of MB a layer without this."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        pass


def _call(function: Callable, args: tuple, kwargs: dict) -> tuple[Any, int | None]:
    return function(*args, **kwargs), peak_rss_mb()


def die_with_parent(parent: int) -> None:
    """On Linux, have the kernel send this child SIGTERM when its parent dies: a killed edgeft
    must not leave a fine-tuning or a runtime holding gigabytes behind it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util
    import os
    import signal

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


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
    import os

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        try:
            return pool.submit(_call, function, args, kwargs).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise EdgeftError(
                f"{what}: the process died (a crash in the runtime, or out of memory)"
            ) from exc
