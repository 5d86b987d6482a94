"""app/embedded_broker.py: stale monitoring messages go, job messages stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

from app import embedded_broker
from app.settings import Settings


class TestPrune:
    def test_deletes_only_stale_event_and_control_messages(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path)
        embedded_broker.prepare(settings, consumer=False)
        queue = embedded_broker.root(settings) / "queue"
        old = time.time() - 3600
        names = {
            "old_event": "1_a.celeryev.0f1e.msg",
            "old_control": "2_b.stella@host.celery.pidbox.msg",
            "old_reply": "3_c.reply.celery.pidbox.msg",
            "old_job": "4_d.celery.msg",
            "new_event": "5_e.celeryev.0f1e.msg",
        }
        for key, name in names.items():
            (queue / name).write_text("{}")
            if key.startswith("old"):
                os.utime(queue / name, (old, old))
        assert embedded_broker.prune(settings) == 3
        assert sorted(p.name for p in queue.iterdir()) == sorted(
            [names["old_job"], names["new_event"]]
        )
