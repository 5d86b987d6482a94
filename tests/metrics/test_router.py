"""GET /metrics: who may read it, what it never shows, and its bounded labels."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agents.helpers import assert_problem
from tests.conftest import (
    ADMIN_TOKEN,
    AgentClient,
    Stack,
    dispatch,
    mint_token,
    operator_client,
    register_agent,
    start_stack,
)
from tests.metrics.helpers import parse, scrape, value

REQUESTS = "stella_http_request_duration_seconds_count"


class TestAccess:
    def test_refused_without_the_admin_token(self, stack: Stack) -> None:
        with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context()) as anonymous:
            assert_problem(anonymous.get("/metrics"), 401)
            wrong = anonymous.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
            assert_problem(wrong, 401)

    def test_an_agent_jwt_is_not_enough(self, stack: Stack, register: Any) -> None:
        agent: AgentClient = register()
        assert_problem(agent.http.get("/metrics"), 401)

    def test_the_operator_reads_prometheus_text(self, operator: httpx.Client) -> None:
        response = operator.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        samples = parse(response.text)
        assert ("stella_agents", (("status", "online"),)) in samples
        assert ("stella_tasks", (("status", "pending"),)) in samples


@pytest.fixture(scope="module")
def public_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Metrics public, and every certificate due for renewal as soon as it is issued."""
    yield from start_stack(
        tmp_path_factory.mktemp("public-metrics"),
        database_url,
        worker=False,
        metrics_public=True,
        cert_ttl=3600,
        cert_renewal_window=7200,
    )


def _register(stack: Stack, tmp: Path) -> tuple[httpx.Client, str]:
    with operator_client(stack) as operator:
        data, client = register_agent(stack, operator, tmp, capabilities=["docker"])
    return client, data["agentId"]


class TestPublic:
    def test_anyone_reads_them_where_public_and_renewals_count(
        self, public_stack: Stack, tmp_path: Path
    ) -> None:
        with httpx.Client(
            base_url=public_stack.base_url, verify=public_stack.ssl_context()
        ) as anonymous:
            before = scrape(anonymous)
            agent, agent_id = _register(public_stack, tmp_path)
            with agent:
                answer = agent.post(
                    f"/api/v1/agents/{agent_id}/heartbeat", json={"status": "healthy"}
                )
                assert answer.status_code == 200, answer.text
                assert "certificateRenewal" in answer.json()
            after = scrape(anonymous)
        renewed = "stella_certificates_renewed_total"
        assert value(after, renewed) - value(before, renewed) == 1
        # Every certificate of this stack is within the renewal window: this one too.
        expiring = "stella_certificates_expiring"
        assert value(after, expiring) - value(before, expiring) == 1


class TestNoSecrets:
    def test_no_token_jwt_key_or_credential_appears(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        registration_token = mint_token(operator)
        agent: AgentClient = register()
        created = dispatch(
            operator,
            {"agentId": agent.id},
            credentials={"registry.username": "metrics-user", "registry.password": "s3cr3t-pw"},
        )
        assert created.status_code == 201, created.text
        assert agent.heartbeat().status_code == 200
        response = operator.get("/metrics")
        assert response.status_code == 200
        text = response.text
        assert 'stella_tasks{status="assigned"} 1.0' in text
        key_body = agent.key_file.read_text().splitlines()[1]
        cert_body = agent.cert_file.read_text().splitlines()[1]
        for secret in (
            ADMIN_TOKEN,
            registration_token,
            agent.token,
            agent.token.split(".")[1],
            key_body,
            cert_body,
            "metrics-user",
            "s3cr3t-pw",
            agent.id,
        ):
            assert secret not in text


class TestCardinality:
    def test_unknown_paths_share_one_series_and_ids_never_become_labels(
        self, stack: Stack, register: Any, operator: httpx.Client
    ) -> None:
        agent: AgentClient = register()
        scrape(operator)  # the scrape's own series exists from here on
        before = scrape(operator)
        for _ in range(3):
            assert operator.get(f"/api/v1/nowhere/{uuid.uuid4()}").status_code == 404
        assert operator.patch(f"/api/v1/agents/{uuid.uuid4()}", json={}).status_code == 405
        assert operator.get(f"/api/v1/agents/{agent.id}").status_code == 200
        after = scrape(operator)

        new_series = {key for key in after if key not in before and key[0] == REQUESTS}
        unmatched = {"route": "<unmatched>", "method": "GET", "status": "4xx"}
        by_id = {"route": "/api/v1/agents/{id}", "method": "GET", "status": "2xx"}
        patched = {"route": "/api/v1/agents/{id}", "method": "PATCH", "status": "4xx"}
        for labels in (unmatched, by_id, patched):
            key = (REQUESTS, tuple(sorted(labels.items())))
            assert after[key] - before.get(key, 0.0) >= 1, labels
        assert value(after, REQUESTS, **unmatched) - value(before, REQUESTS, **unmatched) == 3
        assert new_series <= {
            (REQUESTS, tuple(sorted(labels.items()))) for labels in (unmatched, by_id, patched)
        }
        text = operator.get("/metrics").text
        assert "nowhere" not in text
        assert agent.id not in text
