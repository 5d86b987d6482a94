"""The multiprocess directory of `stella serve`: one per web server, under the data dir.

prometheus-client reads PROMETHEUS_MULTIPROC_DIR when it is first imported
and then keeps each counter and histogram of the process in a file there, so
that a scrape answered by any worker sums all of them. This module imports
nothing of prometheus-client at the top: `stella serve` calls
`prepare(settings)` before the web processes import it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from app.settings import Settings

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(settings: Settings, port: int) -> Path:
    """Empty (or create) `<data dir>/metrics/<port>`; point this process and its children at it.

    Emptied at each start: files of a previous server's processes would be
    summed into this one's counters, and their open streams counted as live.
    One per port: two servers sharing a data dir must not empty each other's.
    """
    directory = (settings.data_dir / "metrics" / str(port)).resolve()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[ENV] = str(directory)
    return directory


def forget_live_gauges(pid: int) -> None:
    """Drop a dead web process's live gauges (its open streams are gone with it).

    Its counters and histograms stay: what it counted did happen.
    """
    if not os.environ.get(ENV):
        return
    # Imported here, long after `prepare`: see the module docstring.
    from prometheus_client.multiprocess import mark_process_dead  # noqa: PLC0415

    mark_process_dead(pid)  # type: ignore[no-untyped-call]
