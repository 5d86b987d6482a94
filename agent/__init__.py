"""The reference agent: `stella agent run`.

It talks to the Stella server only over the wire (HTTPS with a client
certificate, and the WebSocket task stream) and imports nothing from `app/`
or `pki/`.

- `state`: the state directory (key, certificate, CAs, JWT, held tasks), mode 0600.
- `client`: the REST calls and the task stream.
- `resources`: CPU, memory and disk usage for heartbeats.
- `runner`: the main loop (heartbeats, stream with polling fallback, task
  supervision, graceful shutdown).
- `executors`: one module per task type.
"""

__version__ = "0.1.0"
