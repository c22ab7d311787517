"""How much CPU other processes took while latency was measured, and whether
a cgroup's CPU quota throttled the measuring processes.

Latency figures are only as good as the machine was quiet: on a 2-core box a
second job running beside validate slows every model, and not by the same
factor (bench/results/latency_spread.md). The load average cannot tell: it
lags a minute, so right after the compress stage it reads 2.0 on an idle
machine. Instead, ``OtherCpu`` reads the busy CPU time of the CPUs this
process may run on (``/proc/stat``'s ``cpuN`` lines for the CPUs of
``sched_getaffinity``: everything but idle and iowait, steal included) and
the CPU time of the measuring processes (``/proc/<pid>/stat``) at both ends
of the measurement: the difference is what other processes (or the
hypervisor) took on those CPUs. A process pinned to some CPUs of a larger
host (``taskset``, ``docker --cpuset-cpus``) is thus measured on its own
CPUs, not on the host's.

In a container with a CPU limit (``docker --cpus``, a Kubernetes CPU limit:
a CFS quota), the measuring processes can be stopped by their own cgroup's
quota while other CPUs stand idle, which ``/proc/stat`` cannot see. The
cgroup's counters can: ``CpuCgroup`` reads the quota (cgroup v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) and how many of the
quota's enforcement periods ran out (``cpu.stat``: ``nr_periods``,
``nr_throttled``) for the process's cgroup and its ancestors (Linux kernel
documentation, Documentation/admin-guide/cgroup-v2.rst, "cpu" controller,
and Documentation/scheduler/sched-bwc.rst).

Neither sees contention that others' CPU time under-counts (processes in
short bursts, the kernel's own writeback, threads of the measuring process
itself). The scheduler's run-queue delay of the measuring threads does:
how long they were ready to run but waited for a CPU (``run_delay_s``,
``OtherCpu.cpu_wait``). Linux only; elsewhere it measures nothing and says
nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

# Above this many cores taken by others on average, the figures are flagged.
BUSY_CORES = 0.25


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def usable_cpus() -> frozenset[int] | None:
    """The logical CPUs this process may run on (``os.sched_getaffinity``;
    its children inherit them), or None where the platform cannot say."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy_ticks(fields: list[str]) -> int:
    values = [int(v) for v in fields[1:9]]
    values += [0] * (8 - len(values))
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return user + nice + system + irq + softirq + steal


def system_busy_s(stat_text: str | None = None, cpus: frozenset[int] | None = None) -> float | None:
    """Seconds of CPU time spent busy since boot (user, nice, system, irq,
    softirq and steal; not idle or iowait), summed over ``cpus`` (their
    ``cpuN`` lines of /proc/stat), or over the whole machine (the ``cpu``
    line) when ``cpus`` is None. None where /proc/stat cannot be read or
    lacks a line asked for (a CPU taken offline). ``stat_text``: the file's
    text (tests)."""
    if stat_text is None:
        try:
            with open("/proc/stat") as f:
                stat_text = f.readline() if cpus is None else f.read()
        except OSError:
            return None
    lines = [line.split() for line in stat_text.splitlines() if line.startswith("cpu")]
    if cpus is None:
        return _busy_ticks(lines[0]) / _ticks() if lines and lines[0] and lines[0][0] == "cpu" else None
    by_cpu = {f[0]: f for f in lines if f and f[0].startswith("cpu") and f[0] != "cpu"}
    try:
        return sum(_busy_ticks(by_cpu[f"cpu{n}"]) for n in cpus) / _ticks()
    except KeyError:
        return None


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


def run_delays_ns(pids) -> dict[tuple[int, int], int] | None:
    """Each live thread's run-queue delay so far, by (pid, tid), in
    nanoseconds: the time it spent ready to run but waiting for a CPU (the
    second field of ``/proc/<pid>/task/<tid>/schedstat``; Linux kernel
    documentation, Documentation/scheduler/sched-stats.rst). A process that
    is gone has no entries; None where no schedstat can be read (not Linux,
    or a kernel without CONFIG_SCHED_INFO)."""
    out: dict[tuple[int, int], int] = {}
    seen = False
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[(int(pid), int(tid))] = int(f.read().split()[1])
                seen = True
            except (OSError, IndexError, ValueError):
                continue
    return out if seen else None


def run_delay_s(pids) -> float | None:
    """Seconds the threads of the live processes ``pids`` have spent ready
    to run but waiting for a CPU (``run_delays_ns`` summed). A process that
    is gone counts 0; None where no schedstat can be read."""
    delays = run_delays_ns(pids)
    return None if delays is None else sum(delays.values()) / 1e9


def run_delay_between_s(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> float:
    """Seconds of run-queue delay the threads accrued between two
    ``run_delays_ns`` readings: each thread alive at ``after`` counts what
    it added since ``before`` (all of it when it started in between). A
    thread that exited in between counts nothing, rather than taking its
    earlier delay off the others' (a sum of the two readings would, and
    could read a block that waited as one that did not)."""
    return sum(max(0, ns - before.get(key, 0)) for key, ns in after.items()) / 1e9


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


def throttle_warning(throttled_share: float | None, quota_cores: float | None, threads: int | None = None
                     ) -> str | None:
    """A warning when the cgroup's CPU quota throttled the measuring
    processes (in ``throttled_share`` > 0 of its enforcement periods), else
    None; ``threads``: the intra-op threads each model ran with, named in
    the advice when above the quota."""
    if not throttled_share or throttled_share <= 0:
        return None
    quota = "" if quota_cores is None else f" ({quota_cores:g} cores)"
    advice = (f": the models ran {threads} threads each, more than the quota; set validate.latency.threads to at "
              f"most {max(1, int(quota_cores))}" if threads and quota_cores is not None and threads > quota_cores
              else ": other processes in the cgroup used its quota")
    return (f"the cgroup's CPU quota{quota} throttled the timed processes in {throttled_share:.1%} of its periods, "
            f"so the latency figures include its stalls{advice}")


def parse_quota(cpu_max: str | None = None, cfs_quota_us: str | None = None,
                cfs_period_us: str | None = None) -> float | None:
    """Cores a CFS quota allows, from cgroup v2's ``cpu.max`` text ("max
    100000": none; "150000 100000": 1.5) or cgroup v1's ``cpu.cfs_quota_us``
    (-1: none) and ``cpu.cfs_period_us`` texts; None when there is no quota.
    Raises ValueError on text that is neither."""
    if cpu_max is not None:
        quota, _, period = cpu_max.strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    if cfs_quota_us is None:
        return None
    quota = int(cfs_quota_us.strip())
    return None if quota < 0 else quota / int((cfs_period_us or "100000").strip())


@dataclass(frozen=True)
class Throttling:
    """A cgroup's CFS bandwidth counters (``cpu.stat``): enforcement
    ``periods`` elapsed while it had runnable tasks, ``throttled`` periods
    in which its quota ran out, and the time its tasks spent throttled
    (``throttled_s``, seconds summed over CPUs). Kubernetes reads the same
    two counts as the throttled share of periods (cAdvisor's
    ``container_cpu_cfs_throttled_periods_total`` over
    ``container_cpu_cfs_periods_total``)."""

    periods: int
    throttled: int
    throttled_s: float


def parse_cpu_stat(stat_text: str) -> Throttling | None:
    """A cgroup's ``cpu.stat`` text as ``Throttling`` (v2: ``nr_periods``,
    ``nr_throttled``, ``throttled_usec`` in microseconds; v1:
    ``throttled_time`` in nanoseconds), or None when it has no bandwidth
    counters (no CPU controller, or text of another kind)."""
    fields = {}
    for line in stat_text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            fields[parts[0]] = int(parts[1])
    if "nr_periods" not in fields or "nr_throttled" not in fields:
        return None
    seconds = (fields["throttled_usec"] / 1e6 if "throttled_usec" in fields
               else fields.get("throttled_time", 0) / 1e9)
    return Throttling(fields["nr_periods"], fields["nr_throttled"], seconds)


def throttled_share(before: Throttling, after: Throttling) -> float:
    """The share of the enforcement periods between two readings in which
    the quota ran out (0 when no period elapsed: the group did not run)."""
    periods = after.periods - before.periods
    return 0.0 if periods <= 0 else max(0, after.throttled - before.throttled) / periods


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class CpuCgroup:
    """The cgroup directories (the process's own and its ancestors, up to
    the mount) whose CPU controller may throttle this process, v1 or v2."""

    version: int
    dirs: tuple[Path, ...]

    def quotas(self) -> dict[Path, float]:
        """Cores allowed by each directory that sets a quota."""
        out = {}
        for d in self.dirs:
            try:
                q = (parse_quota(cpu_max=_read(d / "cpu.max")) if self.version == 2 else
                     parse_quota(cfs_quota_us=_read(d / "cpu.cfs_quota_us"),
                                 cfs_period_us=_read(d / "cpu.cfs_period_us")))
            except ValueError:
                q = None
            if q is not None:
                out[d] = q
        return out

    def quota_cores(self) -> float | None:
        """The tightest quota on the way up (cores), None when none is set."""
        return min(self.quotas().values(), default=None)

    def throttling(self) -> dict[Path, Throttling]:
        """The bandwidth counters so far, by directory that sets a quota."""
        out = {}
        for d in self.quotas():
            text = _read(d / "cpu.stat")
            value = None if text is None else parse_cpu_stat(text)
            if value is not None:
                out[d] = value
        return out


def cpu_cgroup(proc_cgroup: str | None = None, mountinfo: str | None = None) -> CpuCgroup | None:
    """The process's CPU cgroup from ``/proc/self/cgroup`` and
    ``/proc/self/mountinfo`` (their texts may be given: tests): the v1
    hierarchy with the ``cpu`` controller when mounted, else the v2 one;
    None where neither can be found (not Linux, no cgroup mounted)."""
    if proc_cgroup is None or mountinfo is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) if proc_cgroup is None else proc_cgroup
        mountinfo = _read(Path("/proc/self/mountinfo")) if mountinfo is None else mountinfo
        if proc_cgroup is None or mountinfo is None:
            return None
    paths = {}   # "cpu" (v1) or "" (v2) -> the process's path in that hierarchy
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in (parts[1].split(",") if parts[1] else [""]):
                paths[controller] = parts[2]
    mounts = {}
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = fields[3], fields[4]
        if tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            mounts.setdefault(1, (root, point))
        elif tail[0] == "cgroup2":
            mounts.setdefault(2, (root, point))
    for version, key in ((1, "cpu"), (2, "")):
        if version in mounts and key in paths:
            root, point = mounts[version]
            path = paths[key]
            if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
                path = path[len(root.rstrip("/")):]
            elif root != "/":
                path = "/"    # outside the mount's root (a namespaced container): the mount is ours
            top = Path(point)
            leaf = top / path.lstrip("/")
            dirs = [leaf, *[p for p in leaf.parents if p == top or top in p.parents]]
            if version == 2 and not (top / "cgroup.controllers").is_file():
                continue
            return CpuCgroup(version, tuple(dirs))
    return None


class OtherCpu:
    """A block's measurement of what other processes took on this process's
    CPUs and of how long a cgroup CPU quota throttled it: ``with
    OtherCpu(pids) as load: ...``, then ``load.cores`` (None where /proc is
    not there), ``load.cpus`` (the CPUs measured), ``load.quota_cores`` (the
    cgroup's CPU quota, None when none), ``load.throttled_share`` (the share
    of the quota's enforcement periods during the block in which it ran
    out, the most of any cgroup level with a quota; None without a quota),
    ``load.cpu_wait`` (how many of the measuring processes' threads were, on
    average over the block, ready to run but waiting for a CPU: their
    run-queue delay accrued by the threads alive at its end,
    ``run_delay_between_s``, per second; None where not readable),
    ``load.cpu_wait_share`` (that over ``threads``, the threads of the work
    measured: the share of their time spent waiting) and
    ``load.warning(cpus)``. ``pids``: a callable returning the measuring
    processes' ids (read at both ends); ``cgroup``: the ``CpuCgroup`` to
    read (True, the default: this process's, ``cpu_cgroup()``; None: none);
    ``threads``: at least 1."""

    def __init__(self, pids, cgroup: "CpuCgroup | None | bool" = True, threads: int = 1):
        self._pids = pids
        self._cgroup_arg = cgroup
        self._threads = max(1, threads)
        self.cores: float | None = None
        self.cpus: int | None = None
        self.quota_cores: float | None = None
        self.throttled_share: float | None = None
        self.cpu_wait: float | None = None

    @property
    def cpu_wait_share(self) -> float | None:
        """``cpu_wait`` over the threads measured; None where not measured."""
        return None if self.cpu_wait is None else self.cpu_wait / self._threads

    def __enter__(self) -> "OtherCpu":
        self._cpus = usable_cpus()
        self.cpus = len(self._cpus) if self._cpus else (os.cpu_count() or 1)
        self._cgroup = cpu_cgroup() if self._cgroup_arg is True else self._cgroup_arg or None
        self.quota_cores = self._cgroup.quota_cores() if self._cgroup else None
        self._throttling = self._cgroup.throttling() if self._cgroup else {}
        self._delays = run_delays_ns(self._pids())
        self._busy, self._own, self._t = system_busy_s(cpus=self._cpus), process_cpu_s(self._pids()), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        busy, wall = system_busy_s(cpus=self._cpus), time.monotonic() - self._t
        if self._busy is not None and busy is not None:
            self.cores = other_cores(self._busy, busy, self._own, process_cpu_s(self._pids()), wall)
        delays = run_delays_ns(self._pids())
        if self._delays is not None and delays is not None and wall > 0:
            self.cpu_wait = run_delay_between_s(self._delays, delays) / wall
        after = self._cgroup.throttling() if self._cgroup else {}
        shares = [throttled_share(self._throttling[d], after[d]) for d in after if d in self._throttling]
        self.throttled_share = max(shares) if shares else None

    def warning(self, cpus: int | None = None) -> str | None:
        """``busy_warning`` of the block's figure (None when not measured)."""
        return None if self.cores is None else busy_warning(self.cores, cpus or self.cpus or os.cpu_count() or 1)


# Above this share of a cgroup quota's enforcement periods throttled while
# the models were timed, the timing counts as disturbed (timed again, and
# the latency gates say so). Validate's five models with 2 threads in a
# 2-core quota, or 1 thread in a 1-core quota, were throttled in 0.3-2.3% of
# the periods, with figures as without a quota; with 2 threads in a 1-core
# quota, in 92-93%, the teacher's p95 61.8-64.8 ms against 13.2-22.0 ms
# (bench/results/cpu_quota.md).
THROTTLED_SHARE = 0.05


# Above this share of the timed threads' time spent ready to run but
# waiting for a CPU (their run-queue delay, ``run_delay_between_s``, per second and
# per latency thread), the timing counts as disturbed (timed again, and the
# latency gates say so). Validate's five models with 2 threads on 2 quiet
# cores waited 1.9-2.5% of the time, with 1 thread 0.4%; beside one
# process spinning at 25% duty (others 10% of the CPUs, under the share
# gate), 2 threads waited 8.9-9.3% and a copy of production read up to
# +0.144 slower than production (the re-distilled student +0.508), where 1
# thread waited 0.7-0.8% and read it -0.005 to +0.016: a spare core
# (bench/results/load_levels.md, 14:46, with the tokenizer on the caller's
# thread as in every stage).
CPU_WAIT_SHARE = 0.04


def is_disturbed(cores: float | None, throttled_share: float | None, cpu_wait_share: float | None = None) -> bool:
    """Whether a timing was disturbed: others took more than ``BUSY_CORES``
    cores (``is_busy``), the cgroup's quota throttled more than
    ``THROTTLED_SHARE`` of its periods, or the timed threads waited for a
    CPU more than ``CPU_WAIT_SHARE`` of the time. None measured: False."""
    return (is_busy(cores) or (throttled_share is not None and throttled_share > THROTTLED_SHARE)
            or (cpu_wait_share is not None and cpu_wait_share > CPU_WAIT_SHARE))


def disturbance(cores: float | None, cpus: int | None, throttled_share: float | None,
                cpu_wait_share: float | None = None) -> float | None:
    """How disturbed a timing was, as one share to compare timings by: the
    largest of the share of ``cpus`` that others took (``cores / cpus``),
    the throttled share of the quota's periods and the share of the time
    the timed threads waited for a CPU; None when none was measured."""
    shares = [x for x in (None if cores is None or not cpus else cores / cpus, throttled_share, cpu_wait_share)
              if x is not None]
    return max(shares) if shares else None
