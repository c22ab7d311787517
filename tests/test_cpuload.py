"""What other processes took while latency was measured (shrinkflow/cpuload.py):
/proc/stat parsed, the arithmetic on its boundaries, and a real busy
process beside a measured block."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shrinkflow.cpuload import BUSY_CORES, OtherCpu, busy_warning, is_busy, other_cores, process_cpu_s, system_busy_s


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
