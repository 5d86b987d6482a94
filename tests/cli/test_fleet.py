"""`stella fleet guard|forecast` as a process against a real TLS server."""

from __future__ import annotations

import json

from tests.cli.test_operator import stella
from tests.conftest import Stack
from tests.tasks.helpers import Register, set_agent_status


class TestGuard:
    def test_shows_the_guard_released_by_default(self, stack: Stack) -> None:
        table = stella(stack, "fleet", "guard")
        assert table.returncode == 0, table.stderr
        assert "engaged" in table.stdout
        assert "yes" not in table.stdout
        as_json = json.loads(stella(stack, "fleet", "guard", "--json").stdout)
        assert as_json["engaged"] is False
        assert as_json["agentsHeld"] == 0


class TestForecast:
    def test_an_offline_agent_is_at_risk_and_a_heartbeating_one_is_not(
        self, stack: Stack, register: Register
    ) -> None:
        lost, alive = register("lost-01"), register("alive-01")
        assert alive.heartbeat().status_code == 200
        set_agent_status(stack, lost, "offline")

        table = stella(stack, "fleet", "forecast", "--hours", "48")
        assert table.returncode == 0, table.stderr
        assert "1 agent(s) at risk" in table.stdout
        assert lost.id in table.stdout
        assert alive.id not in table.stdout

        answer = json.loads(stella(stack, "fleet", "forecast", "--hours", "48", "--json").stdout)
        assert answer["expiring"] == 2
        assert answer["atRisk"] == 1
        assert [(agent["agentId"], agent["reason"]) for agent in answer["agents"]] == [
            (lost.id, "offline")
        ]

    def test_a_bad_horizon_is_refused_before_any_request(self, stack: Stack) -> None:
        result = stella(stack, "fleet", "forecast", "--hours", "0")
        assert result.returncode == 2
        assert "--hours" in result.stderr
