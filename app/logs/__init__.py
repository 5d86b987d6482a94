"""The service's logs: one structured line per event, a request id that follows the work.

- `context`: the request id of the work in hand (a context variable).
- `middleware`: gives every HTTP request and task stream one, and answers it in `X-Request-ID`.
- `formatting`: JSON lines (the default) or text for humans (`STELLA_LOG_FORMAT=text`).
- `redaction`: the last guard against a secret in a log line.
- `setup`: the logging configuration web, worker and beat processes share.
"""
