"""The benchmark timing helpers (issue 20, "benchmarks that cannot mislead"): alternation, paired ratios, and the
busy-machine monitor measured against a real competing process."""

import subprocess
import sys
import time

import pytest

from vlpeft_jax.benchmarks import timing


def test_alternate_swaps_the_order_every_round_and_times_only_after_warmup():
    calls = []
    sides = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b", "c")}
    times, results = timing.alternate(sides, rounds=3, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    assert calls[6:] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3} and results == {"a": "a", "b": "b",
                                                                                            "c": "c"}
    with pytest.raises(ValueError, match="rounds=0"):
        timing.alternate(sides, rounds=0)


def test_alternate_times_each_call():
    times, _ = timing.alternate({"slow": lambda: time.sleep(0.03), "fast": lambda: None}, rounds=2, warmup=0)
    assert min(times["slow"]) >= 0.03 > max(times["fast"])


def test_paired_ratio_and_summary_by_hand():
    r = timing.paired_ratio([3.0, 10.0, 4.0, 6.0], [1.0, 2.0, 2.0, 1.0])  # ratios 3, 5, 2, 6
    assert r["median"] == 4.0 and r["q1"] == pytest.approx(2.75) and r["q3"] == pytest.approx(5.25)
    with pytest.raises(ValueError, match="equally long"):
        timing.paired_ratio([1.0], [1.0, 2.0])
    s = timing.time_summary([5.0, 1.0, 3.0])
    assert (s["median_s"], s["min_s"], s["q1_s"], s["q3_s"]) == (3.0, 1.0, 2.0, 4.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the other-process CPU share reads /proc/stat")
def test_monitor_counts_other_processes_not_its_own_work():
    with timing.Monitor(verbose=False) as own:  # this process busy for 0.6 s: not "other"
        end = time.perf_counter() + 0.6
        while time.perf_counter() < end:
            pass
    assert own.other_cpu_share is not None and own.other_cpu_share < timing.OTHER_CPU_WARN
    assert own.warnings == []
    n = min(timing.usable_cores(), 4)  # spinning processes, each one core busy for the whole window
    code = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    spins = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        time.sleep(0.3)  # the interpreters have started and spin
        with timing.Monitor(verbose=False) as busy:
            time.sleep(1.0)
    finally:
        for spin in spins:
            spin.kill()
            spin.wait()
    expected = n / timing.usable_cores()
    assert busy.other_cpu_share > 0.6 * expected
    if 0.6 * expected > timing.OTHER_CPU_WARN:
        assert len(busy.warnings) == 1 and "other processes used" in busy.warnings[0]
    rec = busy.record()
    assert rec["warnings"] == busy.warnings and len(rec["load_average_before"]) == 3 and rec["wall_s"] >= 1.0


def test_busy_warning_falls_back_to_the_load_average():
    cores = timing.usable_cores()
    assert timing.busy_warning([0.6 * cores, 0, 0], None) is not None
    assert timing.busy_warning([0.4 * cores, 0, 0], None) is None
    assert timing.busy_warning([10.0 * cores, 0, 0], 0.0) is None  # a measured share wins over the load average
