"""`--label key=value` arguments, as the agent commands take them."""

from __future__ import annotations


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """`["k=v", ...]` → `{"k": "v"}`; ValueError names the bad pair."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not key=value")
        labels[key] = value
    return labels
