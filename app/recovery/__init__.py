"""Lockout-proof renewal: re-certifying an agent whose certificate lapsed (STELLA_CERT_GRACE)."""
