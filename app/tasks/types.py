"""What the server knows about task types: whether running one twice is harmless.

The server accepts any task type (an agent may bring executors of its own),
so this is a declaration for the known ones, not a whitelist. It decides what
happens to a task whose agent is lost (STELLA_OUTCOME_UNKNOWN): an idempotent
task keeps today's course; any other becomes `unknown`, so that a deploy that
may well have happened is not reported as failed and retried.

A type not declared here counts as not idempotent: calling "maybe done" a
failure is what makes someone run a deploy twice; the reverse costs a look.
"""

from __future__ import annotations

IDEMPOTENT: dict[str, bool] = {
    "docker.pull": True,  # pulling the same reference twice leaves the same image
    "docker.run": False,  # a second run starts a second container (or clashes on its name)
    "compose.up": False,  # converges, but it (re)creates containers: not safe to call done
    "shell.exec": False,  # anything at all
}


def is_idempotent(task_type: str) -> bool:
    """True for a type declared idempotent; unknown types are not (see the module docstring)."""
    return IDEMPOTENT.get(task_type, False)


def idempotent_types() -> tuple[str, ...]:
    return tuple(sorted(name for name, idempotent in IDEMPOTENT.items() if idempotent))
