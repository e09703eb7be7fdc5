"""SIGKILL of random workers while tens of thousands of jobs and hundreds of workflows run."""

from __future__ import annotations

import pytest

from tests.faults.conftest import MakeScenario
from tests.faults.scenario import verdict

TINY_JOBS = 20_000
WORKFLOWS = 200
KILLS = 8


@pytest.mark.timeout(400)
async def test_sigkill_random_workers(make_scenario: MakeScenario) -> None:
    s = make_scenario("sigkill")
    async with s.running():
        workers = [s.cluster.start(f"w{i}", {"default": 10}) for i in range(3)]
        await s.enqueue_tiny(TINY_JOBS)
        await s.insert_workflows(WORKFLOWS)
        total = len(s.expected_jobs)
        # Kill one worker each time another slice of the bodies has started (progress,
        # not the clock, sets the pace), and start a new one in its place at once.
        for kill in range(1, KILLS + 1):
            await s.wait_started(total * kill // (KILLS + 2))
            victim = s.random.choice(workers)
            await s.cluster.kill(victim)
            s.faults["sigkill"] += 1
            workers[workers.index(victim)] = s.cluster.restart(victim)
            s.faults["restarted"] += 1
        violations = await s.finish(settle_timeout=60)
    assert not violations, verdict(violations)
