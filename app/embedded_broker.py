"""The embedded broker: kombu's filesystem transport in the data dir.

It needs no server, works across processes and supports fanout, so
`celery inspect` and Flower see the workers. Two of its habits need care:
- each consumed message moves through the temp dir; a temp dir on another
  filesystem makes that copy-then-delete, so consumers keep theirs here;
- fanout queues outlive their consumers (a stopped Flower's event queue, a
  stopped worker's control queue) and fill with messages nobody reads;
  `prune` deletes those once they are old. Job messages are never pruned.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from app.settings import Settings

# Messages of these queues are monitoring chatter: safe to drop once stale.
_EPHEMERAL_QUEUE_MARKERS = ("celeryev.", ".pidbox")
STALE_AFTER_SECONDS = 600.0


def root(settings: Settings) -> Path:
    return settings.data_dir / "broker"


def transport_options(settings: Settings) -> dict[str, object]:
    base = root(settings)
    return {
        "data_folder_in": str(base / "queue"),
        "data_folder_out": str(base / "queue"),
        "control_folder": str(base / "control"),
        "polling_interval": 0.1,
    }


def prepare(settings: Settings, *, consumer: bool) -> None:
    """Create the folders; in consuming processes, keep temp moves on this disk."""
    base = root(settings)
    for folder in ("queue", "control", "tmp"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    if consumer:
        tempfile.tempdir = str(base / "tmp")


def prune(settings: Settings, *, max_age: float = STALE_AFTER_SECONDS) -> int:
    """Delete stale event and control messages that no live consumer will read."""
    cutoff = time.time() - max_age
    pruned = 0
    for path in (root(settings) / "queue").glob("*.msg"):
        # File names are "<ms>_<uuid>.<queue>.msg".
        queue = path.name.partition(".")[2].removesuffix(".msg")
        if not any(marker in queue for marker in _EPHEMERAL_QUEUE_MARKERS):
            continue
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                pruned += 1
        except FileNotFoundError:
            continue  # consumed meanwhile
    return pruned
