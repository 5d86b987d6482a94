"""agent/resources.py: usage figures from /proc and statvfs."""

from __future__ import annotations

from pathlib import Path

from agent.resources import ResourceProbe, disk_percent, memory_percent


def test_cpu_is_measured_between_two_samples(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    probe = ResourceProbe(disk_path=tmp_path, stat=stat, meminfo=tmp_path / "missing")
    stat.write_text("cpu  175 0 125 900 0 0 0 0 0 0\n")
    # 100 busy jiffies out of 200.
    assert probe.sample() == {"cpu": 50.0, "disk": disk_percent(tmp_path)}


def test_memory_counts_what_is_not_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 250 kB\n")
    assert memory_percent(meminfo) == 75.0


def test_the_real_machine_reports_all_three(tmp_path: Path) -> None:
    usage = ResourceProbe(disk_path=tmp_path).sample()
    assert set(usage) == {"cpu", "memory", "disk"}
    assert all(0 <= value <= 100 for value in usage.values())


def test_unmeasurable_figures_are_left_out(tmp_path: Path) -> None:
    probe = ResourceProbe(
        disk_path=tmp_path / "nowhere", stat=tmp_path / "no-stat", meminfo=tmp_path / "no-mem"
    )
    assert probe.sample() == {}
