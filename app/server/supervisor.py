"""uvicorn's multiprocess supervisor, telling the metrics when a web process is gone."""

from __future__ import annotations

from uvicorn.supervisors import Multiprocess

from app.metrics.multiprocess import forget_live_gauges


class MetricsAwareMultiprocess(Multiprocess):
    """Drops the live gauges (open task streams) of each worker it replaces or retires."""

    def keep_subprocess_alive(self) -> None:
        before = self._pids()
        super().keep_subprocess_alive()
        self._forget(before - self._pids())

    def restart_all(self) -> None:
        before = self._pids()
        super().restart_all()
        self._forget(before - self._pids())

    def _pids(self) -> set[int]:
        return {process.pid for process in self.processes if process.pid is not None}

    @staticmethod
    def _forget(pids: set[int]) -> None:
        for pid in pids:
            forget_live_gauges(pid)
