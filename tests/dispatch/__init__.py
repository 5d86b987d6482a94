"""Tests of selector dispatches: acceptance, fan-out and idempotent expansion."""
