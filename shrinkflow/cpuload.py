"""How much CPU other processes took while latency was measured.

Latency figures are only as good as the machine was quiet: on a 2-core box a
second job running beside validate slows every model, and not by the same
factor (bench/results/latency_spread.md). The load average cannot tell: it
lags a minute, so right after the compress stage it reads 2.0 on an idle
machine. Instead, ``OtherCpu`` reads the machine's busy CPU time
(``/proc/stat``: everything but idle and iowait, steal included) and the CPU
time of the measuring processes (``/proc/<pid>/stat``) at both ends of the
measurement: the difference is what other processes (or the hypervisor)
took. Linux only; elsewhere it measures nothing and says nothing.
"""

from __future__ import annotations

import os
import time

# Above this many cores taken by others on average, the figures are flagged.
BUSY_CORES = 0.25


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def system_busy_s(stat_text: str | None = None) -> float | None:
    """Seconds of CPU time the whole machine has spent busy since boot (the
    ``cpu`` line of /proc/stat, summed over cores: user, nice, system, irq,
    softirq and steal; not idle or iowait), or None where /proc/stat cannot
    be read. ``stat_text``: the file's text (tests)."""
    if stat_text is None:
        try:
            with open("/proc/stat") as f:
                stat_text = f.readline()
        except OSError:
            return None
    fields = stat_text.split()
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]
    values += [0] * (8 - len(values))
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / _ticks()


def process_cpu_s(pids) -> float:
    """Seconds of CPU time (user + system) the live processes ``pids`` have
    used; a process that is gone counts 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()   # the name may hold spaces
        total += int(fields[11]) + int(fields[12])     # utime, stime (fields 14 and 15)
    return total / _ticks()


def other_cores(busy_before: float, busy_after: float, own_before: float, own_after: float,
                wall_s: float) -> float:
    """Cores other processes took on average over ``wall_s`` seconds: the
    machine's busy CPU seconds less the measuring processes' own, per second
    (never below 0: the two clocks tick apart by a few hundredths)."""
    if wall_s <= 0:
        return 0.0
    return max(0.0, ((busy_after - busy_before) - (own_after - own_before)) / wall_s)


def is_busy(cores: float | None, threshold: float = BUSY_CORES) -> bool:
    """Whether others took more than ``threshold`` cores on average (False
    when not measured: None)."""
    return cores is not None and cores > threshold


def busy_warning(cores: float, cpus: int, threshold: float = BUSY_CORES) -> str | None:
    """A warning when others took more than ``threshold`` cores of ``cpus``
    on average while latency was measured, else None."""
    if not is_busy(cores, threshold):
        return None
    return (f"other processes took {cores:.2f} of {cpus} cores on average while latency was measured: the "
            "latency figures (and the gates and the speedup on them) may be off; measure on a quiet machine")


class OtherCpu:
    """A block's measurement of what other processes took: ``with
    OtherCpu(pids) as load: ...``, then ``load.cores`` (None where /proc is
    not there) and ``load.warning(cpus)``. ``pids``: a callable returning
    the measuring processes' ids (read at both ends)."""

    def __init__(self, pids):
        self._pids = pids
        self.cores: float | None = None

    def __enter__(self) -> "OtherCpu":
        self._busy, self._own, self._t = system_busy_s(), process_cpu_s(self._pids()), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        busy = system_busy_s()
        if self._busy is not None and busy is not None:
            self.cores = other_cores(self._busy, busy, self._own, process_cpu_s(self._pids()),
                                     time.monotonic() - self._t)

    def warning(self, cpus: int | None = None) -> str | None:
        """``busy_warning`` of the block's figure (None when not measured)."""
        return None if self.cores is None else busy_warning(self.cores, cpus or os.cpu_count() or 1)
