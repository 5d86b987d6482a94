"""SQL filters on an agent's capabilities and labels, for both databases.

PostgreSQL answers with JSONB containment (`@>`, GIN-indexable); SQLite
with `json_each`. Values are always bound parameters, never spliced into SQL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from sqlalchemy import ColumnElement, and_, cast, exists, func, literal, select, true
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import col

from app.models import Agent


def has_capability(dialect: str, capability: str) -> ColumnElement[bool]:
    if dialect == "postgresql":
        return col(Agent.capabilities).op("@>")(cast(literal(json.dumps([capability])), JSONB))
    each = func.json_each(col(Agent.capabilities)).table_valued("value")
    return exists(select(literal(1)).select_from(each).where(each.c.value == capability))


def has_labels(dialect: str, labels: Mapping[str, str]) -> ColumnElement[bool]:
    if not labels:
        return true()
    if dialect == "postgresql":
        return col(Agent.labels).op("@>")(cast(literal(json.dumps(dict(labels))), JSONB))
    conditions = []
    for key, value in labels.items():
        each = func.json_each(col(Agent.labels)).table_valued("key", "value")
        conditions.append(
            exists(
                select(literal(1)).select_from(each).where(each.c.key == key, each.c.value == value)
            )
        )
    return and_(*conditions)


def matches(
    dialect: str, *, capability: str | None, labels: Mapping[str, str] | None
) -> ColumnElement[bool]:
    """Agents that have `capability` (if given) and every one of `labels`."""
    conditions: list[ColumnElement[bool]] = []
    if capability is not None:
        conditions.append(has_capability(dialect, capability))
    if labels:
        conditions.append(has_labels(dialect, labels))
    return and_(true(), *conditions)


__all__ = ["has_capability", "has_labels", "matches"]
