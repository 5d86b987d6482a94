"""Resource usage for heartbeats: CPU, memory and disk, in percent.

Linux `/proc` and `os.statvfs`, no extra dependency. A figure that cannot
be measured here is left out rather than invented.

Usage::

    probe = ResourceProbe(disk_path=Path("/"))
    probe.sample()   # {"cpu": 12.5, "memory": 40.1, "disk": 63.0}
"""

from __future__ import annotations

import os
from pathlib import Path

PROC_STAT = Path("/proc/stat")
PROC_MEMINFO = Path("/proc/meminfo")


def _cpu_times(stat: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies since boot, from the first line of /proc/stat."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(value) for value in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest and guest_nice are already counted in user and nice.
    total = sum(values[:8])
    return total - idle, total


def memory_percent(meminfo: Path = PROC_MEMINFO) -> float | None:
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0])
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    if not total or available is None:
        return None
    return round(100.0 * (total - available) / total, 1)


def disk_percent(path: Path) -> float | None:
    """Used space as `df` counts it: used / (used + available to unprivileged users)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    available = stats.f_bavail * stats.f_frsize
    if used + available <= 0:
        return None
    return round(100.0 * used / (used + available), 1)


class ResourceProbe:
    """CPU usage is measured between two samples, so the first one primes it."""

    def __init__(
        self, *, disk_path: Path, stat: Path = PROC_STAT, meminfo: Path = PROC_MEMINFO
    ) -> None:
        self.disk_path = disk_path
        self.stat = stat
        self.meminfo = meminfo
        self._last = _cpu_times(stat)

    def cpu_percent(self) -> float | None:
        now = _cpu_times(self.stat)
        last, self._last = self._last, now
        if now is None or last is None:
            return None
        busy, total = now[0] - last[0], now[1] - last[1]
        if total <= 0:
            return 0.0
        return round(min(100.0, max(0.0, 100.0 * busy / total)), 1)

    def sample(self) -> dict[str, float]:
        usage = {
            "cpu": self.cpu_percent(),
            "memory": memory_percent(self.meminfo),
            "disk": disk_percent(self.disk_path),
        }
        return {name: value for name, value in usage.items() if value is not None}
