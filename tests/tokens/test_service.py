"""app.tokens.service: minting and spending registration tokens against the real databases."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import select, update
from sqlmodel import Session, col

from app.errors import InvalidInput
from app.models import RegistrationToken
from app.tokens import service
from tests.conftest import Stack


def _mint(stack: Stack, ttl_seconds: int | None = None) -> str:
    with Session(stack.runtime.engine) as session:
        token, _row = service.create_token(
            session=session, settings=stack.settings, ttl_seconds=ttl_seconds
        )
        session.commit()
    return token


def _consume(stack: Stack, token: str, *, commit: bool = True) -> bool:
    with Session(stack.runtime.engine) as session:
        spent = service.consume_token(session=session, token=token, agent_id=uuid.uuid4())
        if commit:
            session.commit()
        else:
            session.rollback()
    return spent


class TestCreateToken:
    def test_plaintext_is_prefixed_and_row_holds_its_hash(self, stack: Stack) -> None:
        with Session(stack.runtime.engine) as session:
            token, row = service.create_token(session=session, settings=stack.settings)
            session.commit()
            assert token.startswith(service.TOKEN_PREFIX)
            assert row.token_hash == service.hash_token(token) != token
            assert row.expires_at - row.created_at == dt.timedelta(days=1)

    @pytest.mark.parametrize("ttl", [0, -1, 86401])
    def test_ttl_outside_one_second_to_the_maximum_is_refused(self, stack: Stack, ttl: int) -> None:
        with Session(stack.runtime.engine) as session, pytest.raises(InvalidInput):
            service.create_token(session=session, settings=stack.settings, ttl_seconds=ttl)


class TestConsumeToken:
    def test_spends_once(self, stack: Stack) -> None:
        token = _mint(stack)
        assert _consume(stack, token) is True
        assert _consume(stack, token) is False

    def test_unknown_token_is_refused(self, stack: Stack) -> None:
        assert _consume(stack, service.TOKEN_PREFIX + "nope") is False

    def test_rolled_back_spend_leaves_the_token_usable(self, stack: Stack) -> None:
        """The caller's transaction decides: a failed registration spends nothing."""
        token = _mint(stack)
        assert _consume(stack, token, commit=False) is True
        assert _consume(stack, token) is True

    def test_expired_token_is_refused(self, stack: Stack) -> None:
        token = _mint(stack)
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        with Session(stack.runtime.engine) as session:
            session.execute(update(RegistrationToken).values(expires_at=past))
            session.commit()
        assert _consume(stack, token) is False

    def test_records_the_agent(self, stack: Stack) -> None:
        token = _mint(stack)
        agent_id = uuid.uuid4()
        with Session(stack.runtime.engine) as session:
            assert service.consume_token(session=session, token=token, agent_id=agent_id)
            session.commit()
            row = session.scalars(
                select(RegistrationToken).where(
                    col(RegistrationToken.token_hash) == service.hash_token(token)
                )
            ).one()
        assert row.agent_id == agent_id
        assert row.used_at is not None
