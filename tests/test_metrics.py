"""Prometheus metrics: what a scrape reports after jobs and workflows ran, counters that
never decrease (pruning included), a finish committed late still counted, every read of a
scrape served by an index on a table of a million finished jobs, and the HTTP endpoints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anyio
import httpx
import psycopg
import pytest

import baton
from baton import metrics
from baton.pricing import ModelPrice, Pricing
from baton.testing import running_worker, wait_for_job, wait_for_workflow
from baton.worker import Worker, WorkerSettings
from tests.conftest import bound
from tests.helpers import sql_rows

app = baton.Baton()


@app.step
async def ok() -> str:
    return "done"


@app.step(max_attempts=3, backoff=lambda attempt: 0.0)
async def fails_once(ctx: baton.Context) -> int:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return ctx.attempt


@app.step(max_attempts=2, backoff=lambda attempt: 0.0)
async def always_fails() -> None:
    raise ValueError("always")


@app.step(queue="llm", llm=True)
async def ask(ctx: baton.Context) -> str:
    ctx.record_usage(model="model-a", input_tokens=1000, output_tokens=200, cached_tokens=400)
    ctx.record_usage(model="unpriced", input_tokens=10, output_tokens=5)
    return "answer"


@app.step(max_attempts=1)
async def explode() -> None:
    raise RuntimeError("boom")


PRICES = Pricing(models={
    "model-a": ModelPrice(input=Decimal(3), output=Decimal(15), cached_input=Decimal("0.3")),
})

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition, by name and label set."""
    samples: Samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        assert match, line
        labels = frozenset(_LABEL.findall(match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def counters(samples: Samples) -> Samples:
    return {key: v for key, v in samples.items()
            if key[0].endswith(("_total", "_bucket", "_sum", "_count"))}


@pytest.fixture
async def metered(dsn: str) -> AsyncIterator[baton.Baton]:
    app.pricing = PRICES
    async with bound(app, dsn) as bound_app:
        yield bound_app


async def run_everything(app: baton.Baton) -> dict[str, Any]:
    """Run three plain jobs, one that fails once, one that fails twice, a job cancelled
    before it ran, a job scheduled for later, an LLM workflow and a failing workflow."""
    ids = [await app.enqueue(ok.new()) for _ in range(3)]
    flaky = await app.enqueue(fails_once.new())
    broken = await app.enqueue(always_fails.new())
    cancelled = await app.enqueue(ok.new().options(queue="other"))
    assert await app.cancel(cancelled)
    later = await app.enqueue(ok.new().options(schedule_in=3600))
    good = baton.Workflow("good")
    good.add("ask", ask.new())
    good.add("after", ok.new(), deps=["ask"])
    bad = baton.Workflow("bad")
    bad.add("explode", explode.new())
    good_id, bad_id = await app.insert(good), await app.insert(bad)
    async with running_worker(app, queues={"default": 4, "llm": 2}):
        for job_id in ids:
            await wait_for_job(app, job_id, "completed")
        await wait_for_job(app, flaky, "completed")
        await wait_for_job(app, broken, "discarded")
        await wait_for_workflow(app, good_id)
        await wait_for_workflow(app, bad_id)
    return {"later": later}


async def test_a_scrape_reports_jobs_workflows_and_usage(metered: baton.Baton) -> None:
    await run_everything(metered)
    samples = parse(await metrics.scrape(metered))

    def finished(step: str, state: str, queue: str = "default") -> float:
        return value(samples, "baton_jobs_finished_total", queue=queue, step=step, state=state)

    ok_step, flaky, broken = ok.name, fails_once.name, always_fails.name
    assert finished(ok_step, "completed") == 4  # three plain jobs and the workflow's "after"
    assert finished(flaky, "completed") == 1
    assert finished(broken, "discarded") == 1
    assert finished(ok_step, "cancelled", "other") == 1
    assert finished(ask.name, "completed", "llm") == 1
    assert finished(explode.name, "discarded") == 1
    assert value(samples, "baton_job_retries_total", queue="default", step=flaky) == 1
    assert value(samples, "baton_job_retries_total", queue="default", step=broken) == 1
    assert value(samples, "baton_job_retries_total", queue="default", step=ok_step) == 0
    assert value(samples, "baton_job_failures_total", queue="default", step=flaky,
                 kind="error") == 1
    assert value(samples, "baton_job_failures_total", queue="default", step=broken,
                 kind="error") == 2
    assert value(samples, "baton_job_failures_total", queue="default", step=explode.name,
                 kind="error") == 1

    # Live jobs: only the one scheduled for later; every live state of a known queue shows.
    assert value(samples, "baton_jobs", queue="default", state="scheduled") == 1
    for state in ("available", "executing", "retryable"):
        assert value(samples, "baton_jobs", queue="default", state=state) == 0
        assert ("baton_jobs", frozenset({("queue", "other"), ("state", state)})) in samples
    assert value(samples, "baton_queue_oldest_available_seconds", queue="default") == 0
    assert value(samples, "baton_workers") == 0  # the worker has gone

    # Durations: one per completed job, buckets cumulative up to +Inf.
    assert value(samples, "baton_job_duration_seconds_count", queue="default") == 5
    assert value(samples, "baton_job_duration_seconds_count", queue="llm") == 1
    bounds = [*map(metrics._number, metrics.BUCKETS), "+Inf"]
    cumulative = [value(samples, "baton_job_duration_seconds_bucket", queue="default", le=le)
                  for le in bounds]
    assert cumulative == sorted(cumulative) and cumulative[-1] == 5
    assert 0 < value(samples, "baton_job_duration_seconds_sum", queue="default") < 60

    assert value(samples, "baton_workflows_finished_total", outcome="completed") == 1
    assert value(samples, "baton_workflows_finished_total", outcome="failed") == 1
    assert value(samples, "baton_workflows_running") == 0

    assert value(samples, "baton_llm_calls_total", model="model-a") == 1
    assert value(samples, "baton_llm_calls_total", model="unpriced") == 1
    assert value(samples, "baton_llm_tokens_total", model="model-a", kind="input") == 1000
    assert value(samples, "baton_llm_tokens_total", model="model-a", kind="output") == 200
    assert value(samples, "baton_llm_tokens_total", model="model-a", kind="cached") == 400
    assert value(samples, "baton_llm_tokens_total", model="unpriced", kind="output") == 5
    # 600 uncached * 3 + 400 cached * 0.3 + 200 out * 15, per million tokens
    assert value(samples, "baton_llm_cost_usd_total", model="model-a") == pytest.approx(0.00492)
    assert ("baton_llm_cost_usd_total", frozenset({("model", "unpriced")})) not in samples

    # A second scrape (the first advanced the watermarks) reads the same totals, and the
    # sync path agrees.
    again = parse(await metrics.scrape(metered))
    assert counters(again) == counters(samples)
    sync = parse(await anyio.to_thread.run_sync(metrics.scrape_sync, metered))
    assert counters(sync) == counters(samples)


async def test_counters_never_decrease_across_pruning(metered: baton.Baton) -> None:
    # A transaction left open holds the watermarks back: every finish is read past them
    # at each scrape, so only the pruner's own advance can save them from being lost.
    with psycopg.connect(metered.dsn) as holder:
        holder.execute("SELECT 1")
        await run_everything(metered)
        before = parse(await metrics.scrape(metered))
        assert value(before, "baton_jobs_finished_total", queue="default", step=ok.name,
                     state="completed") == 4
        [(uncounted,)] = sql_rows(
            metered.dsn, "SELECT count(*) FROM baton.jobs WHERE finalized_at >= "
                         "(SELECT counted_until FROM baton.metrics_sources "
                         "WHERE source = 'jobs')")
        assert uncounted == 9
        pruner = Worker(metered, WorkerSettings(prune_after=0.001))
        pruned = await pruner.maintenance.prune()
        assert pruned["jobs"] == 6 and pruned["workflows"] == 2
        after = parse(await metrics.scrape(metered))
        assert counters(after) == counters(before)
        holder.rollback()

    # More work adds to the counters from where they were.
    await metered.enqueue(ok.new())
    async with running_worker(metered):
        [(job_id,)] = sql_rows(metered.dsn, "SELECT id FROM baton.jobs WHERE state <> "
                                            "'scheduled'")
        await wait_for_job(metered, job_id, "completed")
    more = parse(await metrics.scrape(metered))
    for key, old in counters(after).items():
        assert more[key] >= old, key
    assert value(more, "baton_jobs_finished_total", queue="default", step=ok.name,
                 state="completed") == 5


async def test_a_finish_committed_late_is_counted(metered: baton.Baton) -> None:
    job_id = await metered.enqueue(ok.new())
    # A finish dated at its transaction's start, committed after a scrape moved on.
    with psycopg.connect(metered.dsn) as late:
        late.execute("UPDATE baton.jobs SET state = 'cancelled', finalized_at = now() "
                     "WHERE id = %s", [job_id])
        first = parse(await metrics.scrape(metered))
        assert value(first, "baton_jobs_finished_total", queue="default", step=ok.name,
                     state="cancelled") == 0
        late.commit()
    second = parse(await metrics.scrape(metered))
    assert value(second, "baton_jobs_finished_total", queue="default", step=ok.name,
                 state="cancelled") == 1
    [(until,)] = sql_rows(metered.dsn, "SELECT min(counted_until) FROM baton.metrics_sources")
    [(finalized,)] = sql_rows(metered.dsn, "SELECT finalized_at FROM baton.jobs")
    assert until > finalized  # counted by the advance, not only read past the watermark
    third = parse(await metrics.scrape(metered))
    assert counters(third) == counters(second)


async def test_a_finish_read_past_the_watermark_and_retried_drops_out(
    metered: baton.Baton,
) -> None:
    # The one case docs/metrics.md gives of a counter going down: a finish not yet counted
    # by an advance (an open transaction holds the watermark) is undone by a retry.
    job_id = await metered.enqueue(ok.new())
    with psycopg.connect(metered.dsn) as holder:
        holder.execute("SELECT 1")  # open before the job finishes: it holds the horizon
        async with running_worker(metered):
            await wait_for_job(metered, job_id, "completed")
        read = parse(await metrics.scrape(metered))
        assert value(read, "baton_jobs_finished_total", queue="default", step=ok.name,
                     state="completed") == 1
        assert await metered.retry(job_id)
        again = parse(await metrics.scrape(metered))
        assert value(again, "baton_jobs_finished_total", queue="default", step=ok.name,
                     state="completed") == 0
        holder.rollback()


async def test_an_advance_under_way_is_left_to_finish(metered: baton.Baton) -> None:
    job_id = await metered.enqueue(ok.new())
    assert await metered.cancel(job_id)
    with psycopg.connect(metered.dsn) as other:  # another scrape's advance, under way
        other.execute("SELECT source FROM baton.metrics_sources FOR UPDATE")
        assert not await metrics.advance(metered)
        samples = parse(await metrics.scrape(metered))  # read past the watermark instead
        assert value(samples, "baton_jobs_finished_total", queue="default", step=ok.name,
                     state="cancelled") == 1
    assert await metrics.advance(metered)
    assert counters(parse(await metrics.scrape(metered))) == counters(samples)
    [(stored,)] = sql_rows(metered.dsn, "SELECT value FROM baton.metrics_counters "
                                        "WHERE name = 'jobs_finished'")
    assert stored == 1


def test_the_horizon_is_no_later_than_the_advance_began(dsn: str) -> None:
    """A transaction that begins while the horizon is read is missing from the read of
    pg_stat_activity, yet dated (its now()) before a clock read after it: were the horizon
    that clock, such a transaction's finishes, committed after the advance, would fall
    behind the watermark uncounted. So the horizon is at most the advance's own start."""
    q = baton.Baton(dsn=dsn).sql
    with psycopg.connect(dsn) as conn:
        conn.execute(q["metrics_read_committed"])
        for _ in range(3):
            [(horizon,)] = conn.execute(q["metrics_horizon"],
                                        {"max_lag": metrics.MAX_LAG, "through_age": None})
            [(began,)] = conn.execute("SELECT now()")
            assert horizon <= began


async def test_a_run_time_on_a_bucket_bound_is_in_that_bucket(metered: baton.Baton) -> None:
    """Prometheus buckets hold the values up to and including their bound (``le``)."""
    sql_rows(metered.dsn, """
        INSERT INTO baton.jobs (state, queue, step, attempt, attempted_at, finalized_at)
        VALUES ('completed', 'default', 's', 1, now() - interval '1 second', now()),
               ('completed', 'default', 's', 1, now(), now())
        RETURNING id""")
    samples = parse(await metrics.scrape(metered))

    def bucket(le: str) -> float:
        return value(samples, "baton_job_duration_seconds_bucket", queue="default", le=le)

    assert (bucket("0.005"), bucket("0.5"), bucket("1"), bucket("+Inf")) == (1, 1, 2, 2)


async def test_a_read_only_server_is_scraped_without_advancing(metered: baton.Baton) -> None:
    job_id = await metered.enqueue(ok.new())
    assert await metered.cancel(job_id)
    [(before,)] = sql_rows(metered.dsn, "SELECT min(counted_until) FROM baton.metrics_sources")
    replica = baton.Baton(dsn=psycopg.conninfo.make_conninfo(
        metered.dsn, options="-c default_transaction_read_only=on"))  # as a standby is
    try:
        samples = parse(await metrics.scrape(replica))
        sync = parse(await anyio.to_thread.run_sync(metrics.scrape_sync, replica))
    finally:
        await replica.close()
    for read in (samples, sync):  # read past the watermark, which stayed where it was
        assert value(read, "baton_jobs_finished_total", queue="default", step=ok.name,
                     state="cancelled") == 1
    assert sql_rows(metered.dsn, "SELECT min(counted_until) FROM baton.metrics_sources"
                    ) == [(before,)]


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


def test_every_scrape_read_uses_an_index_on_a_large_table(dsn: str) -> None:
    """A million finished jobs (and finished workflows and usage rows) behind the
    watermark, a few live ones: no statement of a scrape reads jobs, workflows or
    step_stats sequentially."""
    q = baton.Baton(dsn=dsn).sql
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO baton.jobs (state, queue, step, attempt, attempted_at, finalized_at,
                                    inserted_at, scheduled_at)
            SELECT (ARRAY['completed', 'discarded', 'cancelled'])[1 + i % 3],
                   'q' || (i % 5), 'step' || (i % 20), 1,
                   now() - interval '2 days' + make_interval(secs => i * 0.1),
                   now() - interval '2 days' + make_interval(secs => i * 0.1 + 0.5),
                   now() - interval '3 days', now() - interval '3 days'
            FROM generate_series(1, 1000000) AS i""")
        conn.execute("""
            INSERT INTO baton.jobs (state, queue, step, scheduled_at)
            SELECT (ARRAY['available', 'scheduled', 'retryable'])[1 + i % 3], 'q' || (i % 5),
                   'step', now() + make_interval(secs => (i % 3) * 60)
            FROM generate_series(1, 300) AS i""")
        conn.execute("""
            INSERT INTO baton.jobs (state, queue, step, attempt, attempted_at, attempted_by)
            SELECT 'executing', 'q1', 'step', 1, now(), 'w' FROM generate_series(1, 50)""")
        conn.execute("""
            INSERT INTO baton.workflows (id, label, state, total_steps, settled_steps,
                                         inserted_at, finished_at)
            SELECT gen_random_uuid(), 'wf', CASE WHEN i % 4 = 0 THEN 'failed'
                                                 ELSE 'completed' END, 1, 1,
                   now() - interval '3 days', now() - interval '2 days' + make_interval(secs => i)
            FROM generate_series(1, 100000) AS i""")
        conn.execute("""
            INSERT INTO baton.workflows (id, label, total_steps)
            SELECT gen_random_uuid(), 'wf', 1 FROM generate_series(1, 20)""")
        conn.execute("""
            INSERT INTO baton.step_stats (step_name, model, input_tokens, output_tokens, cost,
                                          inserted_at)
            SELECT 's', 'm' || (i % 3), 100, 10, 0.001,
                   now() - interval '2 days' + make_interval(secs => i * 0.5)
            FROM generate_series(1, 300000) AS i""")
        conn.execute("UPDATE baton.metrics_sources SET counted_until = now() - interval '5 s'")
        for table in ("jobs", "workflows", "step_stats"):
            conn.execute(f"VACUUM ANALYZE baton.{table}")
        [(since,)] = conn.execute(
            "SELECT counted_until FROM baton.metrics_sources WHERE source = 'jobs'").fetchall()
        statements = [(name, metrics._delta_params(source, since, "infinity"))
                      for source, name in metrics.SOURCES.items()]
        statements += [("jobs_live_counts", {}), ("metrics_gauges", {})]
        scanned: dict[str, list[str]] = {}
        for name, params in statements:
            [(plan,)] = conn.execute(
                psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ") + q[name], params).fetchall()
            nodes = plan_nodes(plan[0]["Plan"])
            scanned[name] = sorted({f'{n["Node Type"]} {n.get("Index Name", "")}'.strip()
                                    for n in nodes if "Relation Name" in n
                                    or "Index Name" in n})  # a bitmap scan's index too
            seq = [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"
                   and n["Relation Name"] in ("jobs", "workflows", "step_stats")]
            assert not seq, (name, json.dumps(plan, indent=1))
        assert any("jobs_finalized_idx" in s for s in scanned["metrics_jobs_delta"])
        assert any("workflows_finished_idx" in s for s in scanned["metrics_workflows_delta"])
        assert any("step_stats_time_idx" in s for s in scanned["metrics_usage_delta"])
        for index in ("jobs_fetch_idx", "jobs_stage_idx", "jobs_executing_idx"):
            assert any(index in s for s in scanned["jobs_live_counts"]), scanned
        assert any("workflows_running_idx" in s for s in scanned["metrics_gauges"]), scanned


async def test_the_endpoints_serve_the_text_format(metered: baton.Baton) -> None:
    await metered.enqueue(ok.new())
    asgi = metrics.asgi_app(metered)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi),
                                 base_url="http://dash") as client:
        reply = await client.get("/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"] == metrics.CONTENT_TYPE
        assert value(parse(reply.text), "baton_jobs", queue="default", state="available") == 1
        assert (await client.post("/metrics")).status_code == 405

    async with anyio.create_task_group() as tg:
        port = await tg.start(metrics.serve, metered, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            reply = await client.get("/metrics")
            assert reply.status_code == 200
            assert "# TYPE baton_jobs_finished_total counter" in reply.text
            assert value(parse(reply.text), "baton_jobs", queue="default",
                         state="available") == 1
            assert (await client.get("/elsewhere")).status_code == 404
        with pytest.raises(baton.ConfigurationError, match="is another process using the port"):
            await metrics.serve(metered, "127.0.0.1", port)
        tg.cancel_scope.cancel()


async def test_a_database_that_cannot_answer_is_a_503(dsn: str) -> None:
    broken = baton.Baton(dsn=dsn, schema="nowhere")
    asgi = metrics.asgi_app(broken)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi),
                                 base_url="http://dash") as client:
        reply = await client.get("/")
        assert reply.status_code == 503
        assert "metrics unavailable" in reply.text
    await broken.close()


def test_baton_metrics_serves_from_the_command_line(dsn: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "metrics", "--dsn", dsn, "--port", "0", "--log-json"],
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if '"metrics.serving"' in line:
                url = json.loads(line)["url"]
                break
        else:
            pytest.fail(f"baton metrics exited with {proc.wait()}")
        reply = httpx.get(url)
        assert reply.status_code == 200
        assert "# TYPE baton_workers gauge" in reply.text
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_text_format_escapes_labels_and_accumulates_buckets() -> None:
    reading = metrics.Reading()
    reading.add("jobs_finished", {"queue": 'a"b\\c\nd', "step": "s", "state": "completed"}, 2)
    reading.add("job_duration_bucket", {"queue": "q", "le": "0.005"}, 1)
    reading.add("job_duration_bucket", {"queue": "q", "le": "1"}, 2)
    reading.add("job_duration_bucket", {"queue": "q", "le": "+Inf"}, 1)
    reading.add("job_duration_sum", {"queue": "q"}, Decimal("7.25"))
    text = metrics.exposition(reading)
    assert ('baton_jobs_finished_total{queue="a\\"b\\\\c\\nd",state="completed",step="s"} 2'
            in text.splitlines())
    samples = parse(text)
    assert value(samples, "baton_job_duration_seconds_bucket", queue="q", le="0.005") == 1
    assert value(samples, "baton_job_duration_seconds_bucket", queue="q", le="0.5") == 1
    assert value(samples, "baton_job_duration_seconds_bucket", queue="q", le="1") == 3
    assert value(samples, "baton_job_duration_seconds_bucket", queue="q", le="+Inf") == 4
    assert value(samples, "baton_job_duration_seconds_count", queue="q") == 4
    assert value(samples, "baton_job_duration_seconds_sum", queue="q") == 7.25
    assert text.endswith("\n") and "# TYPE baton_job_duration_seconds histogram" in text


async def test_held_workflow_steps_are_counted_as_pending(metered: baton.Baton) -> None:
    wf = baton.Workflow("held")
    wf.add("first", ok.new().options(schedule_in=3600))
    wf.add("second", ok.new(), deps=["first"])
    await metered.insert(wf)
    samples = parse(await metrics.scrape(metered))
    assert value(samples, "baton_jobs", queue="default", state="scheduled") == 1
    assert value(samples, "baton_jobs", queue="default", state="pending") == 1
    assert value(samples, "baton_workflows_running") == 1
