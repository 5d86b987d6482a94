"""The pending index's rules, one by one: errors may only go towards "maybe"."""

from __future__ import annotations

import uuid

from app.tasks.pending_index import PendingIndex


def test_everyone_is_maybe_pending_until_the_first_load() -> None:
    index = PendingIndex()
    assert index.maybe_pending(uuid.uuid4())
    index.load([], epoch=index.epoch)
    assert not index.maybe_pending(uuid.uuid4())


def test_a_claim_that_took_everything_settles_the_agent() -> None:
    index, agent = PendingIndex(), uuid.uuid4()
    index.load([agent], epoch=index.epoch)
    generation = index.generation(agent)
    index.settle(agent, generation)
    assert not index.maybe_pending(agent)


def test_a_task_created_while_the_claim_ran_keeps_the_agent_marked() -> None:
    index, agent = PendingIndex(), uuid.uuid4()
    index.load([agent], epoch=index.epoch)
    generation = index.generation(agent)  # the claim starts...
    index.mark(agent)  # ...a task is created; the claim may not have seen it
    index.settle(agent, generation)
    assert index.maybe_pending(agent)


def test_lost_events_make_everyone_maybe_again_and_an_older_load_does_not_undo_it() -> None:
    index = PendingIndex()
    index.load([], epoch=index.epoch)
    started = index.epoch  # a reconcile reads the database...
    index.forget_all()  # ...Redis drops out meanwhile
    index.load([], epoch=started)
    assert index.maybe_pending(uuid.uuid4())
    index.load([], epoch=index.epoch)
    assert not index.maybe_pending(uuid.uuid4())
