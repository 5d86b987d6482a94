"""Goal 3: the offline sweep over 100,000 agents, under 50 ms at 1 % stale.

The claim is that the sweep's cost follows the stale agents, not the
fleet, so three cases are timed: 1,000 stale of 10,000; the same 1,000
stale of 100,000 (the goal); 10,000 stale of 100,000. Flat from the
first to the second and about tenfold to the third is the claim holding.

The fleet is written with one INSERT … SELECT generate_series (rows as
wide as real ones: a real certificate and public key in every row). Each
case marks every 10th or 100th agent stale and runs VACUUM ANALYZE, so
the planner knows the stale share as autovacuum's statistics would. Each
repetition then times `app.sweeps.service.mark_offline` in one
transaction exactly as the worker's job calls it, commit included, and
makes the same agents stale again, with a VACUUM: the dead row versions
of earlier repetitions would otherwise pile up in the index the sweep
reads (autovacuum clears them in production).

The ceiling is the write every sweep has to make: the same stale rows
set offline by primary key, ids known in advance, in one transaction with
RETURNING, timed the same way. Most of a sweep's time is that write (a
new row version and an entry in every index, per agent), so the two
should stay close; a sweep that scanned the fleet would open a gap that
grows with the fleet.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
import uuid
from collections.abc import Callable
from functools import partial

from sqlalchemy import text

from app.certs import service as certs_service
from app.db import transaction
from app.models.types import utcnow
from app.sweeps import service as sweeps
from bench.results import Check, ScenarioResult
from bench.stack import BenchStack
from pki import generate_agent_key, public_key_pem

NAME = "sweep"
TITLE = "Offline sweep"
FLEET = 100_000
SMALL_FLEET = 10_000
RETRIES = 3  # a repetition the beat's own sweep raced is done again

# Fresh agents heartbeat "ahead of the clock": they stay fresh however long a
# run takes, and the beat's own sweep never has anything to do with them.
INSERT_FLEET = text("""
INSERT INTO agents (id, name, version, status, reported_status, capabilities, labels,
                    running_tasks, registered_at, last_heartbeat, public_key_pem,
                    key_thumbprint, cert_pem, cert_serial, cert_not_after)
SELECT gen_random_uuid(), 'sweep-' || lpad(i::text, 7, '0'), 'bench', 'online', 'healthy',
       CAST('["docker", "compose"]' AS jsonb), CAST('{"site": "bench"}' AS jsonb),
       0, now(), now() + interval '1 day' - random() * interval '30 seconds', :public_key,
       md5(i::text) || md5((-i)::text), :cert_pem, lpad(to_hex(i), 32, '0'), :not_after
FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS i
""")
MAKE_STALE = text("""
UPDATE agents SET status = 'online', last_heartbeat = now() - interval '1 hour' * (1 + random())
WHERE id = ANY(:ids)
""")
MAKE_FRESH = text("""
UPDATE agents SET status = 'online',
       last_heartbeat = now() + interval '1 day' - random() * interval '30 seconds'
WHERE id = ANY(:ids)
""")
PK_UPDATE = text("UPDATE agents SET status = 'offline' WHERE id = ANY(:ids) RETURNING id")


def run(stack: BenchStack, *, quick: bool) -> ScenarioResult:
    repeats = 3 if quick else 9
    _insert_fleet(stack, 1, SMALL_FLEET)
    small = _case(stack, stale_every=10, repeats=repeats)  # 1,000 of 10,000
    _insert_fleet(stack, SMALL_FLEET + 1, FLEET)
    one_pct = _case(stack, stale_every=100, repeats=repeats)  # 1,000 of 100,000
    ten_pct = _case(stack, stale_every=10, repeats=repeats)  # 10,000 of 100,000
    notes = [
        f"median of {repeats} sweeps per case, each in one transaction as the worker runs it; "
        "every 100th (1 %) or 10th agent stale; ceiling: the same rows set offline by "
        "primary key.",
        f"10 times the fleet at 1,000 stale: {one_pct[0] / small[0]:.2f} times the time; "
        f"10 times the stale in 100,000: {ten_pct[0] / one_pct[0]:.2f} times the time.",
    ]
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        figures={
            "sweep_ms_1pct": one_pct[0],
            "sweep_ms_1k_of_10k": small[0],
            "sweep_ms_10pct": ten_pct[0],
        },
        checks=[Check("sweep_ms_1pct", 50, higher_is_better=False, unit=" ms")],
        ceiling={
            "pk_update_ms_1pct": one_pct[1],
            "pk_update_ms_1k_of_10k": small[1],
            "pk_update_ms_10pct": ten_pct[1],
        },
        notes=notes,
    )


def _insert_fleet(stack: BenchStack, first: int, last: int) -> None:
    """Agents number `first`..`last`, online and fresh, one certificate shared by all."""
    key = generate_agent_key()
    issued = certs_service.issue(
        ca=stack.ca, settings=stack.settings, agent_id=uuid.uuid4(), public_key=key.public_key()
    )
    with stack.engine.begin() as connection:
        connection.execute(
            INSERT_FLEET,
            {
                "first": first,
                "last": last,
                "public_key": public_key_pem(key.public_key()),
                "cert_pem": issued.pem,
                "not_after": utcnow() + dt.timedelta(days=365),  # out of the renewal sweep's way
            },
        )


def _case(stack: BenchStack, *, stale_every: int, repeats: int) -> tuple[float, float]:
    """(sweep, ceiling) median milliseconds with every `stale_every`-th agent stale."""
    with stack.engine.connect() as connection:
        ids = list(connection.execute(text("SELECT id FROM agents ORDER BY name")).scalars())
    stale: list[uuid.UUID] = ids[::stale_every]
    _make_stale(stack, stale, analyze=True)
    sweep_ms: list[float] = []
    ceiling_ms: list[float] = []
    for _ in range(repeats):
        sweep_ms.append(_timed(stack, stale, partial(_sweep, stack)))
        ceiling_ms.append(_timed(stack, stale, partial(_pk_update, stack, stale)))
    with stack.engine.begin() as connection:
        connection.execute(MAKE_FRESH, {"ids": stale})
    _maintain(stack, analyze=False)
    return statistics.median(sweep_ms), statistics.median(ceiling_ms)


def _timed(
    stack: BenchStack, stale: list[uuid.UUID], change: Callable[[], list[uuid.UUID]]
) -> float:
    """Milliseconds `change` took to turn exactly the stale agents offline.

    The stale agents are made stale again afterwards, ready for the next one.
    """
    for _ in range(RETRIES):
        started = time.perf_counter()
        changed = change()
        elapsed = (time.perf_counter() - started) * 1000
        _make_stale(stack, stale)
        if set(changed) == set(stale):
            return elapsed
        # The beat's own sweep took some of them first: measure again.
    raise RuntimeError(f"{len(changed)} agents went offline, {len(stale)} were stale")


def _sweep(stack: BenchStack) -> list[uuid.UUID]:
    with transaction(stack.engine) as session:
        return sweeps.mark_offline(session=session, settings=stack.settings)


def _pk_update(stack: BenchStack, stale: list[uuid.UUID]) -> list[uuid.UUID]:
    with transaction(stack.engine) as session:
        return list(session.execute(PK_UPDATE, {"ids": stale}).scalars())


def _make_stale(stack: BenchStack, stale: list[uuid.UUID], *, analyze: bool = False) -> None:
    with stack.engine.begin() as connection:
        connection.execute(MAKE_STALE, {"ids": stale})
    _maintain(stack, analyze=analyze)


def _maintain(stack: BenchStack, *, analyze: bool) -> None:
    """VACUUM the agents table (and ANALYZE it when its make-up changed)."""
    with stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"VACUUM {'(ANALYZE) ' if analyze else ''}agents"))
