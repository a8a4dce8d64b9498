"""Emulating a device profile on the host, and predicting what the host cannot emulate.

The bench worker calls :func:`apply_emulation` after it imports the runtime and before it loads
a model: it pins the process to as many CPUs as the device has decode threads and caps the
address space the app adds to the runtime's libraries near the device's per-app memory. What a
host cannot reproduce (memory bandwidth, microarchitecture, big.LITTLE scheduling,
accelerators, throttling) is listed in ``not_emulated``; decode speed is predicted from the
bandwidth figures instead (:func:`roofline_decode_tok_s`, :func:`scaled_decode_tok_s`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from edgeft.devices import Profile

GB = 10**9

# The address-space cap (RLIMIT_AS) counts virtual memory, which is far more than what is
# resident. It is set after the runtime's libraries are imported and sits that far above them
# (:func:`address_space_cap`): code a phone app does not carry (torch's CUDA build maps 3-5 GB
# of libtorch_cuda, cuBLAS and cuDNN at import, on machines without a GPU too) must not eat the
# budget. What stays counted is what the app does: the model, its KV cache, arenas and thread
# stacks. Measured on Linux x86_64 (glibc, Python 3.11, onnxruntime 1.32, llama-cpp-python
# 0.3.36, torch 2.13 CPU): every runtime thread reserves ~72 MiB (a 64 MiB glibc malloc arena
# and an 8 MiB stack), so 8 threads reserve ~0.6 GB before any model loads, and a cap below
# this floor fails on reservations no app would make. Every shipped profile allows an app 3 GB
# or more, so the floor only matters for user profiles.
ADDRESS_SPACE_FLOOR_BYTES = int(2.5 * GB)

# Always true of an emulation on a host: the runtime runs on the host's own cores and memory.
_NEVER_EMULATED = (
    "CPU microarchitecture and clock: the host's cores run the code",
    "big.LITTLE (heterogeneous core) scheduling",
    "GPU / NPU acceleration",
    "thermal throttling and power limits",
)

# 256 MB: well past any CPU's last-level cache, small enough to allocate on a 2 GB board.
_BENCH_BYTES = 256 * 10**6


@dataclass(frozen=True)
class Emulation:
    """What :func:`apply_emulation` will do in the worker, and what it cannot do."""

    threads: int
    cpus: list[int] | None  # CPU ids to pin to; None: no pinning
    memory_limit_bytes: int | None  # address space above the libraries (RLIMIT_AS); None: none
    applied: list[str]
    not_emulated: list[str]


def _cpu_ranges(cpus: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _host_cpus() -> list[int] | None:
    """The CPU ids this process may run on, or None where the OS cannot tell or pin."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def _host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def plan_emulation(
    profile: Profile,
    *,
    host_cores: int | None = None,
    host_ram_bytes: int | None = None,
    requested_threads: int | None = None,
) -> Emulation:
    """Decide threads, CPU pinning and the memory cap that emulate ``profile`` on this host.

    Args:
        profile: the device to emulate.
        host_cores: CPUs the host offers (default: this process's CPU affinity); when given,
            the CPUs are taken to be ids ``0..host_cores-1``.
        host_ram_bytes: the host's RAM (default: read from the OS).
        requested_threads: threads the user asked for (``--threads``); never above the
            profile's decode threads.

    Returns:
        The plan, with human notes of what is applied and what is not emulated.
    """
    applied: list[str] = []
    not_emulated = [
        f"memory bandwidth ({profile.memory_bandwidth_gbs:g} GB/s): decode speed is "
        "predicted from it instead"
    ]
    not_emulated += _NEVER_EMULATED

    if host_cores is not None:
        cpu_ids: list[int] | None = list(range(host_cores))
    else:
        cpu_ids = _host_cpus()
    available = len(cpu_ids) if cpu_ids is not None else (os.cpu_count() or 1)
    wanted = profile.threads if requested_threads is None else requested_threads
    threads = max(1, min(profile.threads, wanted, available))
    limits = [f"profile {profile.threads}"]
    if requested_threads is not None:
        limits.append(f"requested {requested_threads}")
    limits.append(f"host {available}")
    if threads < profile.threads:
        applied.append(f"threads capped at {threads} ({', '.join(limits)})")
    else:
        applied.append(f"threads {threads} ({', '.join(limits)})")
    if threads < profile.threads and available < profile.threads:
        not_emulated.append(
            f"{profile.threads} decode threads: the host offers only {available} CPUs"
        )

    cpus = cpu_ids[:threads] if cpu_ids is not None else None
    if cpus is not None:
        applied.append(f"pinned to CPUs {_cpu_ranges(cpus)}")
    else:
        not_emulated.append("CPU pinning: os.sched_setaffinity is not available on this OS")

    app_bytes = int(profile.app_memory_gb * GB)
    ram = _host_ram_bytes() if host_ram_bytes is None else host_ram_bytes
    memory_limit: int | None = None
    if not sys.platform.startswith("linux"):
        # macOS accepts RLIMIT_AS but does not enforce it; Windows has no setrlimit.
        not_emulated.append(
            f"app memory {profile.app_memory_gb:g} GB: no address-space cap on {sys.platform}"
        )
    elif ram is not None and app_bytes >= ram:
        not_emulated.append(
            f"app memory {profile.app_memory_gb:g} GB: the host has only {ram / GB:.1f} GB "
            "of RAM, so no cap was set"
        )
    elif app_bytes >= ADDRESS_SPACE_FLOOR_BYTES:
        memory_limit = app_bytes
        applied.append(
            f"memory capped at {app_bytes / GB:.1f} GB of address space above the runtime's "
            "libraries (RLIMIT_AS)"
        )
    else:
        memory_limit = ADDRESS_SPACE_FLOOR_BYTES
        applied.append(
            f"memory capped at {memory_limit / GB:.1f} GB of address space above the runtime's "
            "libraries (RLIMIT_AS), the floor that thread reservations need"
        )
        not_emulated.append(
            f"app memory {profile.app_memory_gb:g} GB: below the "
            f"{memory_limit / GB:.1f} GB address-space floor; only the peak-RSS budget "
            "checks it"
        )
    if memory_limit is not None:
        not_emulated.append(
            "the runtime's own code: the cap counts the address space mapped above its "
            "libraries, since the host's builds (torch's CUDA build maps several GB) are not "
            "what an app ships"
        )
    return Emulation(
        threads=threads,
        cpus=cpus,
        memory_limit_bytes=memory_limit,
        applied=applied,
        not_emulated=not_emulated,
    )


def _pin_all_threads(cpus: list[int]) -> None:
    """Pin every thread of this process: libraries imported earlier (OpenBLAS in numpy) may
    already have started threads, and ``sched_setaffinity(0, ...)`` moves only the caller."""
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(tid, cpus)
    os.sched_setaffinity(0, cpus)


def library_bytes() -> int:
    """Address space this process has mapped from shared libraries (``*.so*`` files in
    ``/proc/self/maps``); 0 where the OS does not tell."""
    total = 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and ".so" in os.path.basename(fields[5].rstrip("\n")):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    total += end - start
    except OSError:
        return 0
    return total


def address_space_cap(emulation: Emulation) -> int | None:
    """The RLIMIT_AS :func:`apply_emulation` sets now: the planned memory limit above the
    shared libraries already mapped (``None``: no cap planned)."""
    if emulation.memory_limit_bytes is None:
        return None
    return emulation.memory_limit_bytes + library_bytes()


def apply_emulation(emulation: Emulation) -> list[str]:
    """Apply CPU pinning and the memory cap to this process, after the runtime's libraries are
    imported and before the model loads: the cap counts what the app allocates on top of the
    libraries (:func:`address_space_cap`).

    Never raises for an unsupported platform or a refused limit.

    Returns:
        Notes of what could not be applied (empty when everything was).
    """
    failed: list[str] = []
    if emulation.cpus is not None:
        try:
            _pin_all_threads(emulation.cpus)
        except (AttributeError, OSError, ValueError) as exc:
            failed.append(f"pinning to CPUs {_cpu_ranges(emulation.cpus)} failed: {exc}")
    cap = address_space_cap(emulation)
    if cap is not None:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            lower = [limit for limit in (soft, hard) if limit != resource.RLIM_INFINITY]
            effective = min([cap, *lower])
            if effective < cap:
                failed.append(
                    f"memory cap {cap / GB:.1f} GB: an existing limit of {effective / GB:.1f} GB "
                    "(RLIMIT_AS) is lower and applies instead"
                )
            if soft == resource.RLIM_INFINITY or soft > effective:
                resource.setrlimit(resource.RLIMIT_AS, (effective, hard))
        except (ImportError, AttributeError, OSError, ValueError) as exc:
            failed.append(f"memory cap {cap / GB:.1f} GB (RLIMIT_AS) failed: {exc}")
    return failed


def kv_bytes_per_token(
    n_layers: int, n_kv_heads: int, head_dim: int, bytes_per_element: float = 2
) -> float:
    """Bytes the KV cache grows per token: K and V for every layer (fp16 by default)."""
    return 2 * n_layers * n_kv_heads * head_dim * bytes_per_element


def roofline_decode_tok_s(
    bandwidth_gbs: float,
    weight_bytes: float,
    kv_bytes_per_token: float = 0,
    depth: int = 0,
) -> float:
    """The bandwidth bound on batch-1 decode speed: every token reads all weights once plus
    the KV cache written so far (``depth`` tokens).

    Raises:
        ValueError: a non-positive bandwidth or weight size, or a negative KV size or depth.
    """
    if not bandwidth_gbs > 0 or not weight_bytes > 0:
        raise ValueError(
            f"bandwidth_gbs ({bandwidth_gbs}) and weight_bytes ({weight_bytes}) must be positive"
        )
    if kv_bytes_per_token < 0 or depth < 0:
        raise ValueError(
            f"kv_bytes_per_token ({kv_bytes_per_token}) and depth ({depth}) must be >= 0"
        )
    return bandwidth_gbs * GB / (weight_bytes + kv_bytes_per_token * depth)


def scaled_decode_tok_s(
    host_tok_s: float, host_bandwidth_gbs: float, device_bandwidth_gbs: float
) -> float:
    """A measured host decode speed scaled by the device/host bandwidth ratio.

    Decode at batch 1 is bandwidth-bound, so this is the estimate shown beside the measured
    figure; it ignores compute limits, which slow small cores further.

    Raises:
        ValueError: a non-positive bandwidth.
    """
    if not host_bandwidth_gbs > 0 or not device_bandwidth_gbs > 0:
        raise ValueError(
            f"bandwidths must be positive (host {host_bandwidth_gbs}, "
            f"device {device_bandwidth_gbs})"
        )
    return host_tok_s * device_bandwidth_gbs / host_bandwidth_gbs


def measure_host_bandwidth(seconds: float = 0.3, *, threads: int | None = None) -> float:
    """Host memory read bandwidth in GB/s: the best of repeated sums over a 256 MB array.

    Args:
        seconds: how long to repeat the measurement (at least two runs).
        threads: reader threads (numpy releases the GIL while summing); default: every CPU
            this process may use, since one core cannot saturate memory on most hosts.
    """
    import numpy as np

    if threads is None:
        cpus = _host_cpus()
        threads = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    data = np.ones(_BENCH_BYTES // 4, dtype=np.float32)  # written once: pages are resident
    parts = np.array_split(data, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        deadline = time.perf_counter() + seconds
        runs = 0
        while runs < 2 or (time.perf_counter() < deadline and runs < 50):
            start = time.perf_counter()
            list(pool.map(np.add.reduce, parts))
            best = min(best, time.perf_counter() - start)
            runs += 1
    return data.nbytes / best / GB
