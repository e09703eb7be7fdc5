"""The server restarted under load: ``pg_ctl restart -m fast``, then ``-m immediate``."""

from __future__ import annotations

import anyio
import pytest

from tests.faults.conftest import MakeScenario
from tests.faults.scenario import verdict


@pytest.mark.timeout(400)
async def test_server_restarts_fast_and_immediate(make_scenario: MakeScenario) -> None:
    s = make_scenario("server_restart")
    if not s.server.embedded:
        pytest.skip("needs the suite's own embedded server to restart it")
    async with s.running():
        for i in range(2):
            s.cluster.start(f"w{i}", {"default": 10})
        await s.enqueue_tiny(8_000)
        await s.insert_workflows(100)
        total = len(s.expected_jobs)
        for step, mode in enumerate(("fast", "immediate"), start=1):
            await s.wait_started(total * step // 3)
            await anyio.to_thread.run_sync(s.server.restart, mode)
            s.faults[f"restart_{mode}"] += 1
        violations = await s.finish()
    assert not violations, verdict(violations)
