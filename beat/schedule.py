"""The beat schedule, as data: job names and intervals from settings.

Every entry expires after one interval, so a backlog (a worker down for a
while) does not replay a pile of identical sweeps when it comes back.
"""

from __future__ import annotations

from typing import Any

from app.jobs import uses_embedded_broker
from app.settings import Settings

TOKEN_PURGE_INTERVAL = 600.0
BROKER_PRUNE_INTERVAL = 300.0


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    sweep = float(settings.resolved_sweep_interval)
    entries = {
        "mark-offline": ("sweeps.mark_offline", sweep),
        "time-out-tasks": ("sweeps.time_out_tasks", sweep),
        "issue-renewals": ("sweeps.issue_renewals", sweep),
        "redrive-dispatches": ("sweeps.redrive_dispatches", sweep),
        "purge-tokens": ("sweeps.purge_tokens", TOKEN_PURGE_INTERVAL),
    }
    if uses_embedded_broker(settings):
        entries["prune-embedded-broker"] = ("sweeps.prune_embedded_broker", BROKER_PRUNE_INTERVAL)
    return {
        name: {"task": job, "schedule": interval, "options": {"expires": interval}}
        for name, (job, interval) in entries.items()
    }
