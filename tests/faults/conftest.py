"""Fixtures of the fault scenarios: a fresh database with the test's own tables."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, bound
from tests.faults import app as faults_app
from tests.faults.harness import prepare
from tests.faults.scenario import Scenario

MakeScenario = Callable[..., Scenario]


@pytest.fixture
async def make_scenario(dsn: str, pg_server: Server, tmp_path: Path
                        ) -> AsyncIterator[MakeScenario]:
    """Build the test's scenario (``make_scenario(name, **options)``) on its database."""
    prepare(dsn)
    async with bound(faults_app.app, dsn):

        def make(name: str, **options: Any) -> Scenario:
            return Scenario(name, dsn, pg_server, tmp_path, **options)

        yield make
