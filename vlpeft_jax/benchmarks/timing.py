"""Side-by-side timing that a busy machine cannot turn into a misleading ratio (issue 20).

A ratio of two implementations measured one after the other is only as good as the machine was quiet: other
processes slow PyTorch's OpenMP threads far more than XLA's (a decode ratio of 4.84x measured beside the test suite
was 1.2-1.3x idle). The helpers here make every ``bench`` command say how the numbers were taken:

- :func:`alternate` times the sides round by round, each side once per round, the order swapped every round, so
  a change of load hits both sides alike; :func:`paired_ratio` is the median (and quartiles) of the per-round
  ratios, :func:`time_summary` the median and interquartile range of each side.
- :class:`Monitor` records the load average before and after and, on Linux, the CPU time *other* processes used
  while the benchmark ran (``/proc/stat`` busy time minus this process's own CPU time): the load average after a
  run includes the benchmark's own threads, so it cannot say whether something else ran. :func:`busy_warning`
  turns either into one printed warning.
- :func:`thread_settings` records what decides each side's threads (XLA flags, OpenMP/MKL variables, PyTorch's
  intra- and inter-op threads, the cores this process may use).

Example:
    >>> calls = []
    >>> times, results = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2)
    >>> calls  # one warm-up each, then a-b, b-a
    ['a', 'b', 'a', 'b', 'b', 'a']
    >>> len(times["a"]), paired_ratio([2.0, 4.0], [1.0, 1.0])["median"]
    (2, 3.0)
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

OTHER_CPU_WARN = 0.10
"""Warn when other processes used more than this share of the machine's CPU time during a benchmark."""
THREAD_VARIABLES = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "TORCH_NUM_THREADS", "JAX_PLATFORMS")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages (NaN where the platform has none)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else (math.nan, math.nan, math.nan)


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (``statistics.quantiles``, inclusive; the value itself for one sample)."""
    if len(xs) < 2:
        return float(xs[0]), float(xs[0])
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def time_summary(times: Sequence[float]) -> dict[str, Any]:
    """Median, min and interquartile range of the timed calls (seconds).

    Example:
        >>> s = time_summary([0.4, 0.1, 0.2, 0.3])
        >>> round(s["median_s"], 6), s["min_s"], round(s["q1_s"], 6), round(s["q3_s"], 6)
        (0.25, 0.1, 0.175, 0.325)
    """
    q1, q3 = _quartiles(times)
    return {"median_s": statistics.median(times), "min_s": min(times), "q1_s": q1, "q3_s": q3, "times_s": list(times)}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios ``numerator[r] / denominator[r]`` (same round, same load).

    Example:
        >>> paired_ratio([2.0, 3.0, 8.0], [1.0, 1.0, 2.0])
        {'median': 3.0, 'q1': 2.5, 'q3': 3.5}
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired_ratio needs two equally long, non-empty series; got {len(numerator)} and "
                         f"{len(denominator)}")
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    q1, q3 = _quartiles(ratios)
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3}


def alternate(sides: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1
              ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Times every side once per round for ``rounds`` rounds, the order reversed every other round (so neither
    side always runs right after the other's caches, threads or frequency boost), after ``warmup`` untimed calls
    of each (compilation, first-call set-up). Returns ``(seconds per side, each side's last result)``.

    Example: see the module docstring.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: at least one timed round is needed")
    names = list(sides)
    results: dict[str, Any] = {}
    for name in names:
        for _ in range(warmup):
            results[name] = sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            results[name] = sides[name]()
            times[name].append(time.perf_counter() - t0)
    return times, results


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = (int(x) for x in fields[1:])
    steal = rest[0] if rest else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Monitor:
    """Records how busy the machine was while a benchmark ran (a context manager).

    After the ``with`` block: ``load_before`` / ``load_after`` (load averages), ``wall_s``, ``other_cpu_share``
    (the share of all cores' time that *other* processes used meanwhile: ``(system busy - own CPU) / (wall x
    cores)``; None where ``/proc/stat`` is missing) and ``warnings`` (printed once each, see
    :func:`busy_warning`).

    Example:
        >>> with Monitor(verbose=False) as m:
        ...     _ = sum(range(1000))
        >>> m.wall_s >= 0 and len(m.load_before) == 3
        True
    """

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.warnings: list[str] = []
        self.other_cpu_share: float | None = None

    def __enter__(self) -> Monitor:
        self.load_before = load_average()
        self._busy0, self._own0, self._t0 = _system_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall_s = time.perf_counter() - self._t0
        busy1, own1 = _system_busy_seconds(), _own_cpu_seconds()
        self.load_after = load_average()
        if self._busy0 is not None and busy1 is not None and self.wall_s > 0:
            other = (busy1 - self._busy0) - (own1 - self._own0)
            self.other_cpu_share = max(0.0, other) / (self.wall_s * usable_cores())
        msg = busy_warning(self.load_before, self.other_cpu_share)
        if msg:
            self.warnings.append(msg)
            if self.verbose:
                print(msg)

    def start(self) -> Monitor:
        """``with``-less use: :meth:`start` ... :meth:`stop` (for a benchmark with many exits)."""
        return self.__enter__()

    def stop(self) -> None:
        self.__exit__(None, None, None)

    def record(self) -> dict[str, Any]:
        """The JSON record: loads, the other processes' CPU share, the wall time and the warnings."""
        return {"load_average_before": list(self.load_before), "load_average_after": list(self.load_after),
                "other_cpu_share": self.other_cpu_share, "wall_s": self.wall_s, "cores": usable_cores(),
                "warnings": list(self.warnings)}


def describe(monitor: Monitor) -> str:
    """One line on how busy the machine was (for the end of a benchmark's printout).

    Example:
        >>> with Monitor(verbose=False) as m:
        ...     pass
        >>> describe(m).startswith("machine: load average")
        True
    """
    other = "n/a" if monitor.other_cpu_share is None else f"{100 * monitor.other_cpu_share:.0f} %"
    return (f"machine: load average {', '.join(f'{x:.2f}' for x in monitor.load_before)} before, "
            f"{', '.join(f'{x:.2f}' for x in monitor.load_after)} after (1, 5, 15 min); other processes' CPU share "
            f"while it ran {other}; {usable_cores()} cores")


def busy_warning(load_before: Sequence[float], other_cpu_share: float | None) -> str | None:
    """A warning when the machine was busy: other processes used more than :data:`OTHER_CPU_WARN` of the CPU
    time during the run, or (where that is unknown) the 1-minute load average before it exceeded half the cores.

    Example:
        >>> busy_warning([0.1, 0.1, 0.1], 0.02) is None, "busy" in busy_warning([0.1, 0.1, 0.1], 0.4)
        (True, True)
    """
    cores = usable_cores()
    if other_cpu_share is not None:
        if other_cpu_share <= OTHER_CPU_WARN:
            return None
        what = f"other processes used {100 * other_cpu_share:.0f} % of the {cores} cores while it ran"
    elif load_before[0] > 0.5 * cores:
        what = f"the load average was {load_before[0]:.2f} on {cores} cores before it started"
    else:
        return None
    return (f"warning: the machine was busy: {what}; times are inflated and ratios biased (load slows PyTorch's "
            f"threads more than XLA's); rerun on an idle machine before quoting them")


def thread_settings(torch_module: Any = None) -> dict[str, Any]:
    """What decides each side's threads: the environment variables of :data:`THREAD_VARIABLES`, the cores this
    process may use, JAX's backend and device count, and PyTorch's intra/inter-op threads when ``torch_module``
    is given.

    Example:
        >>> s = thread_settings()
        >>> s["cores"] >= 1 and "XLA_FLAGS" in s["environment"]
        True
    """
    import jax

    out: dict[str, Any] = {"cores": usable_cores(), "cpu_count": os.cpu_count(),
                           "environment": {k: os.environ.get(k) for k in THREAD_VARIABLES},
                           "jax_backend": jax.default_backend(), "jax_devices": jax.device_count()}
    if torch_module is not None:
        out.update(torch_threads=torch_module.get_num_threads(),
                   torch_interop_threads=torch_module.get_num_interop_threads())
    return out
