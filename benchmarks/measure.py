"""What every benchmark measures the same way: peak allocator memory, the machine, the load other processes put on it.

* **peak memory** (:func:`measure_peak_memory`) -- the call runs under ``torch.profiler`` with
  ``profile_memory=True``; the allocator's allocation/free events are replayed in time order and the highest running
  total is the peak: bytes PyTorch's CPU allocator held *beyond what was live before the call* (inputs and parameters
  excluded; outputs, saved activations and gradients included). It is the CPU analogue of
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; it does not see allocator slack, the Python
  heap or library scratch buffers that bypass PyTorch's allocator. (Checked once against the ru_maxrss increase of a
  fresh process for FMA at n = 4096: 165 MiB here, 175-189 MiB RSS.)
* **others** (:class:`CpuNeighbours`) -- cores kept busy by other processes (and hypervisor steal), from /proc/stat
  minus this process's CPU time. On a shared machine it marks the timings to distrust.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Dtype names of the command lines and result files."""


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 (libkineto prints unconditional start/stop lines there)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure_peak_memory(call: Callable[[], object]) -> tuple[int, float]:
    """Run ``call`` once under the memory profiler; return (peak allocator bytes above the start, seconds)."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
    finally:
        with _quiet_fd2():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, elapsed


def matmul_rate(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> list[float]:
    """GFLOP/s of ``size x size @ size x size`` (one untimed warm-up, then ``repeats`` samples)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2.0 * size**3 / (time.perf_counter() - start) / 1e9)
    return rates


def system_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class CpuNeighbours:
    """Average number of cores other processes (and hypervisor steal) kept busy between start() and stop().

    System-wide busy time from /proc/stat minus the CPU time of this process and of its children waited for, over
    wall time (so a benchmark subprocess does not count as a neighbour). ``None`` where /proc/stat is unavailable.
    The benchmark reports it per cell: on a shared machine it says which timings to distrust (with every core given
    to torch threads, one busy neighbour can slow small parallel kernels many-fold).
    """

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
            return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return time.process_time() + times.children_user + times.children_system

    def start(self) -> CpuNeighbours:
        self._busy, self._own, self._wall = self._busy_seconds(), self._own_seconds(), time.perf_counter()
        return self

    def stop(self) -> float | None:
        busy, wall = self._busy_seconds(), time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return None
        return max(0.0, (busy - self._busy - (self._own_seconds() - self._own)) / wall)


def format_mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"
