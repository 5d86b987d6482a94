"""When a certificate is due for renewal: the seed's window, or a fraction of its lifetime.

Unset STELLA_CERT_RENEW_AT keeps the seed's rule: due within
STELLA_CERT_RENEWAL_WINDOW of expiry. Set to a fraction f (e.g. 0.67), a
certificate is due once f of its lifetime (STELLA_CERT_TTL) has passed,
moved by a jitter of up to ±5 % of the lifetime that is fixed per agent
(derived from its id): a fleet registered in one minute then renews over
about a tenth of the lifetime, not in one minute, and each agent renews at
the same point of every certificate, whichever process decides.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid

from app.settings import Settings

# The largest shift of an agent's renewal point, as a fraction of the lifetime.
JITTER = 0.05


def agent_jitter(agent_id: uuid.UUID) -> float:
    """A number in [-1, 1), the same for an agent every time, spread evenly over a fleet."""
    digest = hashlib.sha256(b"stella-renew-at:" + agent_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") / 2**63 - 1


def renewal_threshold(settings: Settings, agent_id: uuid.UUID) -> dt.timedelta:
    """How long before its expiry a certificate of `agent_id` is due for renewal."""
    fraction = settings.cert_renew_at
    if fraction is None:
        return dt.timedelta(seconds=settings.cert_renewal_window)
    lifetime = settings.cert_ttl
    passed = fraction + JITTER * agent_jitter(agent_id)
    remaining = min(max(1.0 - passed, 0.0), 1.0) * lifetime
    return dt.timedelta(seconds=remaining)


def largest_threshold(settings: Settings) -> dt.timedelta:
    """The threshold of the agent that renews earliest: a bound for set-based reads."""
    fraction = settings.cert_renew_at
    if fraction is None:
        return dt.timedelta(seconds=settings.cert_renewal_window)
    remaining = min(max(1.0 - fraction + JITTER, 0.0), 1.0)
    return dt.timedelta(seconds=remaining * settings.cert_ttl)


def renewal_due(
    settings: Settings, agent_id: uuid.UUID, not_after: dt.datetime, now: dt.datetime
) -> bool:
    """Whether a certificate of `agent_id` expiring at `not_after` is due at `now`."""
    return not_after - now <= renewal_threshold(settings, agent_id)
