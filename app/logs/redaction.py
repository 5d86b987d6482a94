"""The last guard against a secret in a log line.

The service never logs a credential on purpose (`tests/security/` checks
every process's logs for a canary). This catches the shapes a secret would
have if a library or a future change did: JWTs, PEM blocks, bearer tokens,
registration tokens. A precheck for their markers keeps the common line
free of regex work.
"""

from __future__ import annotations

import re

_MARKERS = ("eyJ", "-----BEGIN", "earer", "srt_")
_PATTERNS = (
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted jwt]"),
    (
        re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?(-----END \1-----|$)", re.DOTALL),
        r"[redacted \1]",
    ),
    (re.compile(r"([Bb]earer)\s+[^\s\"',;]+"), r"\1 [redacted]"),
    (re.compile(r"srt_[A-Za-z0-9_-]{8,}"), "[redacted registration token]"),
)


def redact(text: str) -> str:
    if not any(marker in text for marker in _MARKERS):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
