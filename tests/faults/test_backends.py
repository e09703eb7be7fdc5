"""``pg_terminate_backend`` on the workers' connections, and on the event subscriber's."""

from __future__ import annotations

import anyio
import pytest

from tests.faults.conftest import MakeScenario
from tests.faults.harness import Subscriber, query
from tests.faults.scenario import Scenario, verdict

ROUNDS = 6


async def terminate(s: Scenario, application_name: str) -> int:
    """Terminate the backends of the scenario's database whose connection is named like
    ``application_name`` (a LIKE pattern); return how many."""
    rows = await query(s.dsn, """
        SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n
        FROM pg_stat_activity
        WHERE datname = current_database() AND application_name LIKE %s
          AND pid <> pg_backend_pid()""", (application_name,))
    return int(rows[0]["n"])


@pytest.mark.timeout(300)
async def test_worker_backends_terminated(make_scenario: MakeScenario) -> None:
    s = make_scenario("terminate_backend")
    async with s.running():
        for i in range(3):
            s.cluster.start(f"w{i}", {"default": 10})
        await s.enqueue_tiny(8_000)
        await s.insert_workflows(100)
        total = len(s.expected_jobs)
        for step in range(1, ROUNDS + 1):
            await s.wait_started(total * step // (ROUNDS + 2))
            # Every connection of one worker (pool, listener, heartbeat) in turn.
            name = f"w{step % 3}"
            s.faults["backends_terminated"] += await terminate(s, f"faults-worker-{name}")
            s.faults["rounds"] += 1
        violations = await s.finish()
    assert not violations, verdict(violations)
    assert s.faults["backends_terminated"] >= ROUNDS, "worker backends were not found"


@pytest.mark.timeout(200)
async def test_subscriber_connection_cut(make_scenario: MakeScenario) -> None:
    s = make_scenario("subscriber_cut")
    async with s.running():
        s.cluster.start("w0", {"default": 10})
        first = await s.insert_workflows(50)
        with anyio.fail_after(60):
            await s.subscriber.wait_seen(len(first) // 2)
        s.faults["subscriber_cut"] += await terminate(s, Subscriber.NAME)
        await s.insert_workflows(50)
        s.notes["workflows_before_cut"] = len(first)
        violations = await s.finish()
    assert not violations, verdict(violations)
    assert s.faults["subscriber_cut"] >= 1, "the subscriber's connection was not found"
