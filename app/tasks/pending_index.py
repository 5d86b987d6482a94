"""Which agents may have pending tasks: a heartbeat of any other skips the database.

Most heartbeats find nothing to hand over; asking the database each time
is most of a heartbeat's cost. Each web process keeps this index instead:

- `mark` on every `task_created` event (fleet channel, after the commit), and
  for every agent a reconcile finds holding pending work;
- `settle` after a claim that found all there was, unless a mark arrived
  meanwhile (the generation moved): a task created while the claim ran may
  not have been seen by it;
- until the first reconcile has loaded the truth (`known` is False) every
  agent counts as maybe pending, and a RESYNC (events were lost) sends it
  back there.

Errors go one way only: a stale "maybe" costs one empty claim; a missed
mark (a notification lost while Redis stayed reachable for this process)
delays the task until the next periodic reconcile, and the task stream
delivers it meanwhile. Runs on the event loop only.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable


class PendingIndex:
    def __init__(self) -> None:
        self._generation: dict[uuid.UUID, int] = {}
        self._clock = 0
        self.known = False
        # Bumped by `forget_all`: a reconcile that began before it proves nothing.
        self.epoch = 0

    def maybe_pending(self, agent_id: uuid.UUID) -> bool:
        return not self.known or agent_id in self._generation

    def generation(self, agent_id: uuid.UUID) -> int:
        """Pass this to `settle` after a claim that starts now."""
        return self._generation.get(agent_id, 0)

    def mark(self, agent_id: uuid.UUID) -> None:
        self._clock += 1
        self._generation[agent_id] = self._clock

    def settle(self, agent_id: uuid.UUID, generation: int) -> None:
        """The claim that started at `generation` took everything pending."""
        if self._generation.get(agent_id, 0) == generation:
            self._generation.pop(agent_id, None)

    def load(self, agent_ids: Iterable[uuid.UUID], *, epoch: int) -> None:
        """A reconcile's answer, read from the database after `epoch` was current."""
        for agent_id in agent_ids:
            self.mark(agent_id)
        if epoch == self.epoch:
            self.known = True

    def forget_all(self) -> None:
        """Events may have been missed: everyone is maybe pending until the next load."""
        self.epoch += 1
        self.known = False
