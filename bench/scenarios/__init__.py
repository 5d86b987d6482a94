"""The scenarios, in the order `python -m bench` runs them.

Each module has `NAME` and `run(stack, *, quick) -> ScenarioResult`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from bench.results import ScenarioResult

MODULES = ("heartbeats", "sweep", "dispatch", "streams", "registration")


class Scenario(Protocol):
    NAME: str
    run: Callable[..., ScenarioResult]


def load(name: str) -> Scenario:
    module: Scenario = importlib.import_module(f"bench.scenarios.{name}")
    return module
