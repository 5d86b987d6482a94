"""The embedded broker: kombu's filesystem transport in the data dir.

It needs no server, works across processes and supports fanout, so
`celery inspect` and Flower see the workers. Four of its habits need care
(the first two are bugs of kombu 5.7's transport, fixed in `Channel`):
- a message file is created, then written: a consumer could read it empty,
  so `Channel` writes it aside and renames it in, whole;
- an exchange's binding file is truncated before it is locked: concurrent
  first binds lose bindings or corrupt it, so `Channel` binds under the lock;
- each consumed message moves through the temp dir; a temp dir on another
  filesystem makes that copy-then-delete, so consumers keep theirs here;
- fanout queues outlive their consumers (a stopped Flower's event queue, a
  stopped worker's control queue) and fill with messages nobody reads;
  `prune` deletes those once they are old. Job messages are never pruned.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from app.settings import Settings

# Celery's `broker_transport` for the embedded broker (the URL stays filesystem://).
TRANSPORT = "app.embedded_broker:Transport"

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


class Channel(filesystem.Channel):
    """kombu's filesystem channel, publishing each message whole.

    kombu creates the message file in the queue folder, then writes it: a
    consumer polling in between reads it empty, cannot decode it, loses the
    message and stops the worker ("Unrecoverable error: JSONDecodeError").
    Written under a name no consumer matches, then renamed in (atomic on one
    filesystem), a message appears complete or not at all.
    """

    # `payload`, as kombu's filesystem channel names it (its base says `message`).
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        partial = folder / f".{name}.part"
        try:
            partial.write_bytes(str_to_bytes(dumps(payload)))  # type: ignore[no-untyped-call]
            os.replace(partial, folder / name)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc

    # Bindings (`<exchange>.exchange` in the control folder). kombu creates the
    # file with "wb", truncating, before it takes the lock: two first binds at
    # once (Flower's parallel inspect threads, workers starting together) lose a
    # binding, read the file empty (JSONDecodeError) or leave it corrupt for
    # good. Here it is created without truncation and rewritten under the lock,
    # and a file still empty reads as no bindings.
    def get_table(self, exchange: Any) -> list[Any]:
        file: Path = self._exchange_file(exchange)  # type: ignore[no-untyped-call]
        try:
            with file.open("rb") as f_obj:
                _fs.lock(f_obj, _fs.LOCK_SH)
                try:
                    data = f_obj.read()
                finally:
                    _fs.unlock(f_obj)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc
        return _bindings(data)

    def _queue_bind(self, exchange: Any, routing_key: Any, pattern: Any, queue: Any) -> None:
        file: Path = self._exchange_file(exchange)  # type: ignore[no-untyped-call]
        self.control_folder.mkdir(exist_ok=True)
        entry = _fs.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            with os.fdopen(os.open(file, os.O_RDWR | os.O_CREAT, 0o644), "rb+") as f_obj:
                _fs.lock(f_obj, _fs.LOCK_EX)
                try:
                    table = _bindings(f_obj.read())
                    if entry not in table:
                        table.insert(0, entry)
                        f_obj.seek(0)
                        f_obj.write(_fs.str_to_bytes(_fs.dumps(table)))
                        f_obj.truncate()
                        f_obj.flush()
                finally:
                    _fs.unlock(f_obj)
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc


# kombu's filesystem module, untyped: its lock helpers, binding tuple and JSON.
_fs: Any = filesystem


def _bindings(data: bytes) -> list[Any]:
    """An exchange file's bindings; a file just created, still empty, has none."""
    if not data.strip():
        return []
    return [_fs.exchange_queue_t(*q) for q in _fs.loads(_fs.bytes_to_str(data))]


class Transport(filesystem.Transport):
    Channel = Channel


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
