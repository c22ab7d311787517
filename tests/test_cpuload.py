"""What other processes took while latency was measured (shrinkflow/cpuload.py):
/proc/stat parsed (the whole machine's line and some CPUs' lines), the
arithmetic on its boundaries, a real busy process beside a measured block
and on a CPU the block is not pinned to, and a cgroup's CPU quota and
throttling read from either cgroup version's files."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shrinkflow.cpuload import (BUSY_CORES, CPU_WAIT_SHARE, THROTTLED_SHARE, CpuCgroup, OtherCpu, Throttling,
                                busy_warning, cpu_cgroup, disturbance, is_busy, is_disturbed, other_cores,
                                parse_cpu_stat, parse_quota, process_cpu_s, run_delay_between_s, run_delay_s,
                               run_delays_ns, system_busy_s,
                                throttle_warning, throttled_share)


def test_busy_time_counts_everything_but_idle_and_iowait():
    tck = os.sysconf("SC_CLK_TCK")
    line = "cpu  100 5 50 1000 20 3 2 10 0 0\n"   # user nice system idle iowait irq softirq steal guest guest_nice
    assert system_busy_s(line) == pytest.approx((100 + 5 + 50 + 3 + 2 + 10) / tck)
    assert system_busy_s("cpu0 1 2 3 4\n") is None and system_busy_s("") is None
    assert system_busy_s("cpu  7 0 3 90\n") == pytest.approx(10 / tck)   # an old kernel's four fields


@pytest.mark.parametrize("busy, own, wall, cores", [
    (2.0, 1.0, 2.0, 0.5),     # one second of others' CPU over two seconds
    (1.0, 1.2, 2.0, 0.0),     # the clocks tick apart: never below 0
    (5.0, 1.0, 0.0, 0.0),     # no time passed: nothing to say
])
def test_other_cores(busy, own, wall, cores):
    assert other_cores(10.0, 10.0 + busy, 3.0, 3.0 + own, wall) == pytest.approx(cores)


def test_the_warning_starts_above_a_quarter_core():
    assert not is_busy(BUSY_CORES) and is_busy(BUSY_CORES + 0.01) and not is_busy(None)
    assert busy_warning(BUSY_CORES, 2) is None
    msg = busy_warning(BUSY_CORES + 0.01, 2)
    assert msg and f"{BUSY_CORES + 0.01:.2f} of 2 cores" in msg and "latency" in msg


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc")
def test_a_busy_process_beside_the_block_is_counted_and_the_block_itself_is_not():
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass\n"
    own_spin = time.time() + 0.5
    with OtherCpu(lambda: [os.getpid()]) as others:
        proc = subprocess.Popen([sys.executable, "-c", spin])
        while time.time() < own_spin:   # the block's own work: not counted as others'
            pass
        proc.wait(timeout=60)
    assert others.cores is not None and others.cores >= 0.5   # the spinner: about a core for most of the block
    assert others.warning(2) is not None
    assert process_cpu_s([os.getpid()]) > 0 and process_cpu_s([2 ** 22 + 7]) == 0   # a pid that is not there


def test_busy_time_of_some_cpus_sums_their_lines():
    tck = os.sysconf("SC_CLK_TCK")
    text = ("cpu  60 0 30 900 0 0 0 0\n"
            "cpu0 10 0 5 300 7 0 0 0\n"
            "cpu1 20 0 10 300 0 0 0 0\n"
            "cpu2 30 0 15 300 0 1 1 2\n"
            "intr 1 2 3\n")
    assert system_busy_s(text, cpus=frozenset({0, 2})) == pytest.approx((15 + 49) / tck)
    assert system_busy_s(text, cpus=frozenset({1})) == pytest.approx(30 / tck)
    assert system_busy_s(text) == pytest.approx(90 / tck)              # no cpus: the whole machine
    assert system_busy_s(text, cpus=frozenset({3})) is None            # a CPU not listed (offline)


@pytest.mark.parametrize("texts, cores", [
    ({"cpu_max": "max 100000\n"}, None),                               # v2, no limit
    ({"cpu_max": "150000 100000\n"}, 1.5),                             # v2: docker --cpus 1.5
    ({"cpu_max": "50000 50000"}, 1.0),
    ({"cfs_quota_us": "-1\n", "cfs_period_us": "100000\n"}, None),     # v1, no limit
    ({"cfs_quota_us": "200000\n", "cfs_period_us": "100000\n"}, 2.0),  # v1
    ({}, None),
])
def test_the_quota_in_cores_from_either_cgroup_version(texts, cores):
    assert parse_quota(**texts) == cores


def test_a_quota_file_of_another_kind_raises():
    with pytest.raises(ValueError):
        parse_quota(cpu_max="unlimited please")


def test_cpu_stat_of_either_version_and_the_throttled_share():
    v2 = parse_cpu_stat("usage_usec 900\nuser_usec 600\nsystem_usec 300\nnr_periods 40\nnr_throttled 10\n"
                        "throttled_usec 250000\nnr_bursts 0\nburst_usec 0\n")
    v1 = parse_cpu_stat("nr_periods 40\nnr_throttled 10\nthrottled_time 250000000\n")
    assert v2 == v1 == Throttling(40, 10, 0.25)
    assert parse_cpu_stat("usage_usec 900\nuser_usec 600\n") is None    # no CPU controller's counters
    later = Throttling(140, 15, 0.3)
    assert throttled_share(v2, later) == pytest.approx(0.05)            # 5 of 100 periods
    assert throttled_share(v2, v2) == 0.0                               # no period: the group did not run


def _mountinfo(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def test_the_cgroup_of_a_v1_cpu_hierarchy_and_its_tightest_quota(tmp_path):
    top = tmp_path / "cpu"
    leaf = top / "kubepods" / "pod1" / "ctr"
    leaf.mkdir(parents=True)
    (top / "kubepods" / "pod1" / "cpu.cfs_quota_us").write_text("150000\n")   # the pod's limit
    (top / "kubepods" / "pod1" / "cpu.cfs_period_us").write_text("100000\n")
    (leaf / "cpu.cfs_quota_us").write_text("-1\n")                            # the container's: none
    (top / "kubepods" / "pod1" / "cpu.stat").write_text("nr_periods 10\nnr_throttled 2\nthrottled_time 5\n")
    found = cpu_cgroup("4:memory:/kubepods/pod1/ctr\n3:cpu,cpuacct:/kubepods/pod1/ctr\n0::/\n", _mountinfo(
        f"32 31 0:29 / {top} rw,relatime - cgroup cgroup rw,cpu,cpuacct",
        f"41 31 0:38 / {tmp_path / 'unified'} rw,relatime - cgroup2 cgroup2 rw"))
    assert found is not None and found.version == 1
    assert found.dirs == (leaf, leaf.parent, leaf.parent.parent, top)
    assert found.quota_cores() == 1.5
    assert found.throttling() == {leaf.parent: Throttling(10, 2, 5e-9)}


def test_the_cgroup_of_a_namespaced_v2_container(tmp_path):
    """In a container with its own cgroup namespace the mount's root is the
    container's cgroup and /proc/self/cgroup says "/"."""
    top = tmp_path / "cgroup"
    top.mkdir()
    (top / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (top / "cpu.max").write_text("100000 100000\n")
    (top / "cpu.stat").write_text("usage_usec 5\nnr_periods 3\nnr_throttled 1\nthrottled_usec 40\n")
    found = cpu_cgroup("0::/\n", _mountinfo(f"30 25 0:26 /../.. {top} rw - cgroup2 cgroup2 rw"))
    assert found is not None and (found.version, found.dirs) == (2, (top,))
    assert found.quota_cores() == 1.0 and found.throttling() == {top: Throttling(3, 1, 4e-5)}
    assert cpu_cgroup("0::/\n", "") is None                              # nothing mounted


def test_a_block_throttled_by_the_quota_says_in_what_share_of_periods(tmp_path):
    top = tmp_path / "cgroup"
    top.mkdir()
    (top / "cgroup.controllers").write_text("cpu\n")
    (top / "cpu.max").write_text("100000 100000\n")
    stat = top / "cpu.stat"
    stat.write_text("nr_periods 100\nnr_throttled 10\nthrottled_usec 0\n")
    with OtherCpu(lambda: [os.getpid()], cgroup=CpuCgroup(2, (top,))) as load:
        stat.write_text("nr_periods 300\nnr_throttled 60\nthrottled_usec 9\n")   # 50 of the block's 200
    assert load.quota_cores == 1.0 and load.throttled_share == pytest.approx(0.25)
    with OtherCpu(lambda: [os.getpid()], cgroup=None) as load:
        pass
    assert load.quota_cores is None and load.throttled_share is None


@pytest.mark.parametrize("cores, share, wait, disturbed", [
    (BUSY_CORES, THROTTLED_SHARE, CPU_WAIT_SHARE, False),   # all at their thresholds: quiet
    (BUSY_CORES + 0.01, None, None, True),
    (None, THROTTLED_SHARE + 0.001, None, True),
    (None, None, CPU_WAIT_SHARE + 0.001, True),             # waited for a CPU while others' share was low
    (0.0, 0.0, CPU_WAIT_SHARE + 0.001, True),
    (None, None, None, False),                              # nothing measured
])
def test_a_timing_is_disturbed_by_others_by_the_quota_or_by_waiting(cores, share, wait, disturbed):
    assert is_disturbed(cores, share, wait) is disturbed


def test_the_disturbance_is_the_largest_share():
    assert disturbance(0.5, 2, 0.1) == pytest.approx(0.25)
    assert disturbance(0.1, 2, 0.3) == pytest.approx(0.3)
    assert disturbance(0.1, 2, None, 0.4) == pytest.approx(0.4)
    assert disturbance(None, None, None, 0.09) == pytest.approx(0.09)
    assert disturbance(None, 2, None) is None and disturbance(0.4, None, None) is None


def test_the_throttle_warning_names_the_threads_when_above_the_quota():
    assert throttle_warning(0.0, 1.0, 2) is None and throttle_warning(None, None) is None
    msg = throttle_warning(0.2, 1.0, 2)
    assert "20.0% of its periods" in msg and "set validate.latency.threads to at most 1" in msg
    assert "other processes in the cgroup" in throttle_warning(0.2, 2.0, 2)


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2,
                    reason="Linux's /proc and two CPUs")
def test_a_pinned_block_counts_its_own_cpus_only():
    """Pinned to CPU 0 with a process spinning on CPU 1: the whole machine
    was a core busier than the CPU the block may run on, and only that CPU
    is what the block measures."""
    spin = "import os, time\nos.sched_setaffinity(0, {1})\nend = time.time() + 1.5\nwhile time.time() < end: pass\n"
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        whole_before, t0 = system_busy_s(), time.monotonic()
        with OtherCpu(lambda: [os.getpid()], cgroup=None) as pinned:
            subprocess.run([sys.executable, "-c", spin], timeout=60, check=True)
        whole = (system_busy_s() - whole_before) / (time.monotonic() - t0)
    finally:
        os.sched_setaffinity(0, cpus)
    assert pinned.cpus == 1
    # CPU 1 was busy the whole block (the spinner, and anything else there): counted by the machine, not the block
    assert whole - pinned.cores >= 0.7, (whole, pinned.cores)


def test_run_delay_of_threads_that_are_gone_or_unreadable():
    assert run_delay_s([2 ** 22 + 7]) is None                  # no such process: nothing read
    own = run_delay_s([os.getpid()])
    assert own is not None and own >= 0


def test_run_delay_between_counts_each_live_threads_own_growth():
    before = {(1, 1): 5_000_000_000, (1, 2): 9_000_000_000, (1, 3): 1_000_000_000}
    after = {(1, 1): 5_500_000_000,            # waited 0.5 s
             (1, 4): 200_000_000}              # started in between: all of its 0.2 s
    # (1, 2) exited with its 9 s: it takes nothing off the others (a sum of the readings read 0)
    assert run_delay_between_s(before, after) == pytest.approx(0.7)
    assert sum(after.values()) < sum(before.values())
    assert run_delay_between_s(after, after) == 0.0


@pytest.mark.slow  # 4-7 s in the quick suite, which must stay under 3 minutes (184 s with it)
def test_a_thread_that_exits_mid_block_leaves_the_others_wait_counted():
    """A helper's finding: a thread that had waited before the block and
    exited during it took its earlier delay off the sum, and the block read
    0. Here a thread waits beside a spinner on the same CPU, then the block
    starts, the thread exits, and the main thread waits beside the spinner."""
    import threading

    spin = "import os, time\nos.sched_setaffinity(0, {0})\nend = time.time() + 4\nwhile time.time() < end: pass\n"
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            pass

    try:
        proc = subprocess.Popen([sys.executable, "-c", spin])
        time.sleep(0.3)
        worker = threading.Thread(target=busy)
        worker.start()
        time.sleep(1.5)                          # the worker waits for CPU 0 beside the spinner
        ids = {(os.getpid(), worker.native_id)}
        assert ids <= set(run_delays_ns([os.getpid()]))
        with OtherCpu(lambda: [os.getpid()], cgroup=None) as block:
            stop.set()
            worker.join()
            end = time.time() + 1.0
            while time.time() < end:
                pass
        proc.wait(timeout=60)
    finally:
        stop.set()
        os.sched_setaffinity(0, cpus)
    assert block.cpu_wait is not None and block.cpu_wait >= 0.2, block.cpu_wait


def test_a_block_that_shares_its_cpu_with_a_spinner_waits_for_it():
    """Pinned with a spinning process to one CPU, the block's own busy loop
    is ready to run about half the time it is not running: the run-queue
    delay says so, where the CPU time others took could not tell the block's
    wait from a fast CPU's."""
    spin = "import os, time\nos.sched_setaffinity(0, {0})\nend = time.time() + 3\nwhile time.time() < end: pass\n"
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        proc = subprocess.Popen([sys.executable, "-c", spin])
        time.sleep(0.5)                          # the spinner is up
        with OtherCpu(lambda: [os.getpid()], cgroup=None) as shared:
            end = time.time() + 1.0
            while time.time() < end:
                pass
        proc.wait(timeout=60)
    finally:
        os.sched_setaffinity(0, cpus)
    assert shared.cpu_wait is not None and shared.cpu_wait >= 0.3, shared.cpu_wait
