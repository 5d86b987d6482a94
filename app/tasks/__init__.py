"""Tasks: dispatch, delivery to agents, completion and cancellation."""
