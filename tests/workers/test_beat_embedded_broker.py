"""The embedded broker under beat's steady publishing: a message is read whole or not yet.

kombu's filesystem transport creates a message file and then writes it; a
worker polling in between read it empty, lost the message and stopped with
"Unrecoverable error: JSONDecodeError" (seen in test_beat_end_to_end). The
configured transport writes each message aside and renames it in.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from queue import Empty
from typing import Any

from app.jobs import make_celery, prepare_embedded_broker
from app.settings import Settings

MESSAGES = 100
# Large enough that a write takes a while: a consumer polls in the middle of it.
BODY = "x" * 2_000_000


def test_a_consumer_polling_during_a_put_never_reads_a_partial_message(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    # consumer=False: leave this process's temp dir alone (a worker moves it here).
    prepare_embedded_broker(settings, consumer=False)
    celery = make_celery(settings)
    received: list[int] = []
    errors: list[BaseException] = []

    with celery.connection_for_write() as producing, celery.connection_for_read() as consuming:
        producer, consumer = producing.default_channel, consuming.default_channel

        def produce() -> None:
            for index in range(MESSAGES):
                producer._put("sweeps", {"body": BODY, "index": index})

        thread = threading.Thread(target=produce)
        thread.start()
        deadline = time.monotonic() + 60
        while len(received) + len(errors) < MESSAGES and time.monotonic() < deadline:
            try:
                message: dict[str, Any] = consumer._get("sweeps")
            except Empty:  # poll again at once: the race is in the middle of a write
                continue
            except Exception as exc:  # a message read before it was whole
                errors.append(exc)
                continue
            received.append(message["index"])
        thread.join(timeout=60)

    assert errors == []
    assert sorted(received) == list(range(MESSAGES))
    leftovers = list((tmp_path / "broker" / "queue").iterdir())
    assert leftovers == []
