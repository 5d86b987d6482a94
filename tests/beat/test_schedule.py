"""beat/schedule.py: the schedule is data built from settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app.settings import Settings
from beat.schedule import beat_schedule

REGISTERED_JOBS = """
from workers.celery_app import celery_app
celery_app.loader.import_default_modules()
print(" ".join(celery_app.tasks))
"""


class TestBeatSchedule:
    def test_sweeps_run_every_sweep_interval_and_expire_after_one(self, tmp_path: Path) -> None:
        schedule = beat_schedule(Settings(data_dir=tmp_path, heartbeat_interval=7))
        for name in ("mark-offline", "time-out-tasks", "issue-renewals", "redrive-dispatches"):
            assert schedule[name]["schedule"] == 7.0
            assert schedule[name]["options"] == {"expires": 7.0}
        explicit = beat_schedule(Settings(data_dir=tmp_path, sweep_interval=2))
        assert explicit["mark-offline"]["schedule"] == 2.0

    def test_every_entry_names_a_registered_job(self, tmp_path: Path) -> None:
        # In a child process: building the worker's Celery app configures the
        # process (temp dir, broker folders) for the data dir it is given.
        listed = subprocess.run(
            [sys.executable, "-c", REGISTERED_JOBS],
            env=os.environ | {"STELLA_DATA_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            check=True,
        )
        registered = set(listed.stdout.split())
        for entry in beat_schedule(Settings(data_dir=tmp_path)).values():
            assert entry["task"] in registered, entry["task"]

    def test_prunes_the_broker_only_when_it_is_the_embedded_one(self, tmp_path: Path) -> None:
        assert "prune-embedded-broker" in beat_schedule(Settings(data_dir=tmp_path))
        redis = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0")
        assert "prune-embedded-broker" not in beat_schedule(redis)
