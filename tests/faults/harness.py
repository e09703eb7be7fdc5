"""The fault scenarios' harness: worker processes, the subscriber, the checks, the figures.

A scenario starts real ``baton worker`` processes (:class:`Cluster`), injects its faults,
stops injecting, waits for the queue to settle (polling table state with a deadline) and
then runs every check. A check returns :class:`Violation` records with their evidence
rather than asserting at once, so that the figures of a failing run are still written
(``tests/faults/last_run.json``, one entry per scenario) before the test fails.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

import baton
from baton.events import WorkflowFinished
from tests.faults import app as faults_app

ROOT = Path(__file__).resolve().parents[2]
FIGURES = Path(__file__).resolve().parent / "last_run.json"
UNSETTLED = ("pending", "scheduled", "available", "executing", "retryable")

# Short liveness settings so the rescue window is seconds, after a leader is killed too.
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TTL = 1.5
WORKER_FLAGS = ("--heartbeat-interval", str(HEARTBEAT_INTERVAL),
                "--heartbeat-ttl", str(HEARTBEAT_TTL), "--leader-ttl", str(HEARTBEAT_TTL),
                "--maintenance-interval", "0.1", "--poll-interval", "0.2",
                "--log-level", "warning")

SCHEMA_SQL = """
CREATE SCHEMA faults;
CREATE TABLE faults.attempts (
    run_id      uuid        NOT NULL,
    phase       text        NOT NULL CHECK (phase IN ('start', 'end')),
    job_id      bigint      NOT NULL,
    attempt     integer     NOT NULL,
    pid         integer     NOT NULL,
    queue       text        NOT NULL,
    workflow_id uuid,
    step        text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, phase)
);
CREATE TABLE faults.results (
    workflow_id uuid        NOT NULL,
    name        text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION faults.note_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO faults.results (workflow_id, name) VALUES (NEW.workflow_id, NEW.name);
    RETURN NEW;
END $$;
CREATE TRIGGER faults_note_result AFTER UPDATE OF result ON baton.nodes
    FOR EACH ROW WHEN (NEW.has_result) EXECUTE FUNCTION faults.note_result();
"""
"""The test's own tables (outside the baton schema): attempts as step bodies record them,
and every time a workflow step's result is stored (a trigger on ``baton.nodes``)."""


def prepare(dsn: str) -> None:
    """Create the test's tables in the scenario's database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)


def now() -> datetime:
    return datetime.now(UTC)


async def query(dsn: str, sql: str, params: Any = None, *, tries: int = 50
                ) -> list[dict[str, Any]]:
    """Run one statement on a fresh connection; retry while the server is away."""
    for failure in range(tries):
        try:
            async with await psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, row_factory=dict_row) as conn:
                cur = await conn.execute(sql, params)
                return await cur.fetchall() if cur.description else []
        except psycopg.OperationalError:
            if failure == tries - 1:
                raise
            await anyio.sleep(0.2)
    raise AssertionError("unreachable")


# -- worker processes ---------------------------------------------------------------------

@dataclass
class WorkerProc:
    """One ``baton worker`` process."""

    name: str
    queues: dict[str, int]
    proc: subprocess.Popen[bytes]
    log: Path
    started_at: datetime
    exited_at: datetime | None = None
    fate: str = "running"
    """``running``, ``killed``, ``stopped`` (SIGTERM) or ``died`` (exited on its own)."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 8) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []


class Cluster:
    """The scenario's worker processes, restarted like a supervisor would."""

    def __init__(self, dsn: str, record_dsn: str, logs: Path) -> None:
        self.dsn = dsn
        self.record_dsn = record_dsn
        self.logs = logs
        self.workers: list[WorkerProc] = []
        self.by_pid: dict[int, WorkerProc] = {}
        self._count = 0

    @property
    def live(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.fate == "running"]

    def start(self, name: str, queues: dict[str, int], *flags: str) -> WorkerProc:
        """Start a worker; its database connections are named ``faults-worker-<name>``."""
        self._count += 1
        spec = ",".join(f"{q}={n}" for q, n in queues.items())
        env = {k: v for k, v in os.environ.items() if k != "BATON_DATABASE_URL"}
        env.update({"BATON_ENV": "production", "PGAPPNAME": f"faults-worker-{name}",
                    faults_app.RECORD_DSN_ENV: self.record_dsn})
        log = self.logs / f"{name}-{self._count}.log"
        with log.open("wb") as out:
            # ``python -m baton`` from the project folder: the worker runs the same code
            # as the test (the ``baton`` script would import whatever is installed).
            proc = subprocess.Popen(
                [sys.executable, "-m", "baton", "worker", "--app", "tests.faults.app:app",
                 "--queues", spec, "--dsn", self.dsn, *WORKER_FLAGS, *flags],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )
        worker = WorkerProc(name, queues, proc, log, now())
        self.workers.append(worker)
        self.by_pid[proc.pid] = worker
        return worker

    def restart(self, worker: WorkerProc, *flags: str) -> WorkerProc:
        return self.start(worker.name, worker.queues, *flags)

    async def kill(self, worker: WorkerProc) -> None:
        """SIGKILL a worker and note when it was dead."""
        worker.proc.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(worker.proc.wait, 30)
        worker.exited_at = now()
        worker.fate = "killed"

    async def stop(self, worker: WorkerProc, timeout: float = 30.0) -> int:
        """SIGTERM a worker, wait for it (SIGKILL after ``timeout``); return its status."""
        worker.proc.send_signal(signal.SIGTERM)
        try:
            code = await anyio.to_thread.run_sync(worker.proc.wait, timeout)
            worker.fate = "stopped"
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = await anyio.to_thread.run_sync(worker.proc.wait, 30)
            worker.fate = "killed"
        worker.exited_at = now()
        return int(code)

    def reap(self) -> list[WorkerProc]:
        """Note workers that exited on their own; return them."""
        died = []
        for worker in self.live:
            if worker.proc.poll() is not None:
                worker.exited_at = now()
                worker.fate = "died"
                died.append(worker)
        return died

    async def stop_all(self) -> None:
        self.reap()
        async with anyio.create_task_group() as tg:
            for worker in self.live:
                tg.start_soon(self.stop, worker)

    def close(self) -> None:
        """Last resort (test teardown): kill whatever still runs."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(30)
                worker.exited_at = worker.exited_at or now()

    def death(self, pid: int) -> datetime | None:
        """When the process ``pid`` was seen gone (``None`` while it runs)."""
        worker = self.by_pid.get(pid)
        return worker.exited_at if worker is not None else None


def appname(dsn: str, name: str) -> str:
    return make_conninfo(dsn, application_name=name)


def upstream_socket(dsn: str) -> str:
    """The Unix socket path of the server ``dsn`` connects to."""
    info = conninfo_to_dict(dsn)
    host = str(info.get("host") or "/tmp")
    if not host.startswith("/"):
        raise ValueError("the proxy needs the suite's server on a Unix socket")
    return f"{host}/.s.PGSQL.{info.get('port') or 5432}"


# -- the subscriber -----------------------------------------------------------------------

class Subscriber:
    """Counts ``workflow_finished`` events from ``app.events.subscribe()`` in the test.

    Its connections are named ``faults-subscriber``. It does not resubscribe: if the
    stream ends, :attr:`error` says how.
    """

    NAME = "faults-subscriber"

    def __init__(self, dsn: str) -> None:
        self.app = baton.Baton(dsn=appname(dsn, self.NAME))
        # Subscribers name their connections themselves; this one takes the test's name.
        self.app.events.application_name = self.NAME
        self.finished: Counter[uuid.UUID] = Counter()
        self.error: str | None = None
        self.expected: set[uuid.UUID] = set()
        self.all_seen = anyio.Event()
        self._thresholds: list[tuple[int, anyio.Event]] = []

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        try:
            async with self.app.events.subscribe() as stream:
                task_status.started()
                started = True
                async for event in stream:
                    if isinstance(event, WorkflowFinished):
                        self.finished[event.workflow_id] += 1
                        if self.expected and self.expected <= set(self.finished):
                            self.all_seen.set()
                        for count, reached in self._thresholds:
                            if len(self.finished) >= count:
                                reached.set()
            self.error = "the event stream ended"
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}".strip()
        finally:
            if not started:
                task_status.started()
            self.all_seen.set()  # nothing more will come

    async def wait_seen(self, count: int) -> None:
        """Wait until ``workflow_finished`` of ``count`` workflows came."""
        reached = anyio.Event()
        self._thresholds.append((count, reached))
        if len(self.finished) >= count:
            reached.set()
        await reached.wait()

    def expect(self, workflow_ids: Iterable[uuid.UUID]) -> None:
        self.expected = set(workflow_ids)
        if self.expected <= set(self.finished):
            self.all_seen.set()


# -- checks -------------------------------------------------------------------------------

@dataclass
class Violation:
    """A broken guarantee, with the evidence."""

    check: str
    detail: str
    evidence: list[Any] = field(default_factory=list)

    def text(self) -> str:
        shown = "\n    ".join(json.dumps(e, default=str) for e in self.evidence[:8])
        more = f"\n    ... {len(self.evidence) - 8} more" if len(self.evidence) > 8 else ""
        return f"[{self.check}] {self.detail}" + (f"\n    {shown}{more}" if shown else "")


@dataclass
class Run:
    """One attempt as the step body recorded it."""

    run_id: uuid.UUID
    job_id: int
    attempt: int
    pid: int
    queue: str
    workflow_id: uuid.UUID | None
    step: str
    start: datetime
    end: datetime | None
    """The end row's time, else when the process was seen dead, else ``None`` (open)."""
    ended_by: str
    """``end`` (the body returned or raised), ``death`` (process gone) or ``open``."""

    def overlaps(self, other: Run) -> bool:
        a_end = self.end or datetime.max.replace(tzinfo=UTC)
        b_end = other.end or datetime.max.replace(tzinfo=UTC)
        return self.start < b_end and other.start < a_end

    def brief(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "pid": self.pid, "start": self.start.isoformat(),
                "end": self.end.isoformat() if self.end else None, "ended_by": self.ended_by}


async def load_runs(dsn: str, cluster: Cluster) -> list[Run]:
    rows = await query(dsn, """
        SELECT s.run_id, s.job_id, s.attempt, s.pid, s.queue, s.workflow_id, s.step,
               s.at AS start, e.at AS end
        FROM faults.attempts AS s
        LEFT JOIN faults.attempts AS e ON e.run_id = s.run_id AND e.phase = 'end'
        WHERE s.phase = 'start'
        ORDER BY s.job_id, s.at""")
    runs = []
    for r in rows:
        end, ended_by = r["end"], "end"
        if end is None:
            end = cluster.death(r["pid"])
            ended_by = "death" if end is not None else "open"
        runs.append(Run(r["run_id"], r["job_id"], r["attempt"], r["pid"], r["queue"],
                        r["workflow_id"], r["step"], r["start"], end, ended_by))
    return runs


async def wait_settled(dsn: str, timeout: float) -> dict[str, int]:
    """Poll until no job is waiting or running, or ``timeout``; return jobs by state."""
    counts: dict[str, int] = {}
    with anyio.move_on_after(timeout):
        while True:
            rows = await query(dsn, "SELECT state, count(*) AS n FROM baton.jobs GROUP BY state")
            counts = {r["state"]: int(r["n"]) for r in rows}
            if not any(counts.get(s) for s in UNSETTLED):
                break
            await anyio.sleep(0.2)
    return counts


async def check_jobs(dsn: str, expected: dict[int, str], cluster: Cluster) -> list[Violation]:
    """Every job enqueued is there, in the final state expected of it."""
    rows = await query(dsn, """
        SELECT j.id, j.step, j.state, j.attempt, j.max_attempts, j.attempted_by,
               j.workflow_id, j.workflow_step, j.errors,
               w.expires_at > now() AS holder_alive, w.pid AS holder_pid
        FROM baton.jobs AS j
        LEFT JOIN baton.worker_registry AS w ON w.id = j.attempted_by
        WHERE j.id = ANY(%s)""", (list(expected),))
    found = {r["id"]: r for r in rows}
    out: list[Violation] = []
    lost = sorted(set(expected) - set(found))
    if lost:
        out.append(Violation("lost", f"{len(lost)} job(s) enqueued are gone", lost[:50]))
    unsettled = [r for r in rows if r["state"] in UNSETTLED]
    if unsettled:
        by_state = Counter(r["state"] for r in unsettled)
        out.append(Violation(
            "unsettled", f"{len(unsettled)} job(s) still waiting or running after the "
            f"rescue window: {dict(by_state)}", [_job_evidence(r, cluster) for r in unsettled]))
    wrong = [r for r in rows if r["state"] not in UNSETTLED and r["state"] != expected[r["id"]]]
    if wrong:
        out.append(Violation(
            "final_state", f"{len(wrong)} job(s) ended in a state other than expected",
            [{**_job_evidence(r, cluster), "expected": expected[r["id"]]} for r in wrong]))
    return out


def _job_evidence(row: dict[str, Any], cluster: Cluster) -> dict[str, Any]:
    pid = row.get("holder_pid")
    proc = cluster.by_pid.get(pid) if pid is not None else None
    return {
        "job_id": row["id"], "step": row["workflow_step"] or row["step"].rsplit(".", 1)[-1],
        "state": row["state"], "attempt": row["attempt"], "attempted_by": row["attempted_by"],
        "holder_heartbeating": row["holder_alive"],
        "holder_process": proc.fate if proc is not None else None,
        "errors": [f"#{e.get('attempt')} {e.get('kind')}: {str(e.get('error'))[:120]}"
                   for e in (row["errors"] or [])][-3:],
    }


async def job_errors(dsn: str, job_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    if not job_ids:
        return {}
    rows = await query(dsn, "SELECT id, errors FROM baton.jobs WHERE id = ANY(%s)",
                       (list(job_ids),))
    return {r["id"]: list(r["errors"] or []) for r in rows}


def _reason(earlier: Run, later: Run, errors: list[dict[str, Any]]) -> str:
    """Why ``later`` (started after ``earlier``) ran the body again."""
    if later.attempt < earlier.attempt:
        return "stale claim: an attempt started after the job was rescued and run again"
    if later.attempt == earlier.attempt:
        return "same attempt (handed back or claim lost)"
    kinds = [str(e.get("kind")) for e in errors if e.get("attempt") == earlier.attempt]
    return kinds[-1] if kinds else "no error recorded"


@dataclass
class RunReport:
    runs: int = 0
    jobs: int = 0
    reruns: Counter[str] = field(default_factory=Counter)
    overlaps: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)


async def check_runs(dsn: str, runs: list[Run], cluster: Cluster) -> RunReport:
    """No two attempts of one job overlapped; count the re-runs and why they happened."""
    report = RunReport(runs=len(runs), jobs=len({r.job_id for r in runs}))
    by_job: dict[int, list[Run]] = {}
    for run in runs:
        by_job.setdefault(run.job_id, []).append(run)
    again = [job_id for job_id, job_runs in by_job.items() if len(job_runs) > 1]
    errors = await job_errors(dsn, again)
    evidence: list[dict[str, Any]] = []
    for job_id in again:
        job_runs = by_job[job_id]
        for earlier, later in itertools.pairwise(job_runs):
            report.reruns[_reason(earlier, later, errors.get(job_id, []))] += 1
        for i, first in enumerate(job_runs):
            for second in job_runs[i + 1:]:
                if first.overlaps(second):
                    why = _reason(first, second, errors.get(job_id, []))
                    report.overlaps[why] += 1
                    evidence.append({
                        "job_id": job_id, "step": first.step, "why": why,
                        "runs": [first.brief(), second.brief()],
                        "errors": [f"#{e.get('attempt')} {e.get('kind')}: "
                                   f"{str(e.get('error'))[:100]}"
                                   for e in errors.get(job_id, [])][-3:]})
    if evidence:
        report.violations.append(Violation(
            "overlap", f"{len(evidence)} pair(s) of attempts of one job ran at the same time "
            f"(why: {dict(report.overlaps)})", evidence))
    report.violations += check_limits(runs, cluster)
    return report


def check_limits(runs: list[Run], cluster: Cluster) -> list[Violation]:
    """No worker process ran more bodies of a queue at once than the queue's limit."""
    events: dict[tuple[int, str], list[tuple[datetime, int, Run]]] = {}
    end_of_time = datetime.max.replace(tzinfo=UTC)
    for run in runs:
        key = (run.pid, run.queue)
        events.setdefault(key, []).append((run.start, 1, run))
        events.setdefault(key, []).append((run.end or end_of_time, -1, run))
    out = []
    for (pid, queue), marks in events.items():
        worker = cluster.by_pid.get(pid)
        if worker is None or queue not in worker.queues:
            continue
        limit = worker.queues[queue]
        running: list[Run] = []
        worst: list[Run] = []
        for _at, delta, run in sorted(marks, key=lambda m: (m[0], m[1])):
            if delta < 0:
                running.remove(run)
                continue
            running.append(run)
            if len(running) > limit and len(running) > len(worst):
                worst = list(running)
        if worst:
            out.append(Violation(
                "queue_limit", f"worker {worker.name} (pid {pid}) ran {len(worst)} bodies of "
                f"queue {queue!r} at once; its limit is {limit}",
                [{"job_id": r.job_id, "step": r.step, **r.brief()} for r in worst]))
    return out


async def check_results_kept(dsn: str, runs: list[Run]) -> list[Violation]:
    """No workflow step's body started again after its result was stored."""
    rows = await query(dsn, """
        SELECT workflow_id, name, min(at) AS first, count(*) AS stores
        FROM faults.results GROUP BY workflow_id, name""")
    stored = {(r["workflow_id"], r["name"]): r for r in rows}
    late = []
    for run in runs:
        row = stored.get((run.workflow_id, run.step)) if run.workflow_id else None
        if row is not None and run.start > row["first"]:
            late.append({"workflow_id": str(run.workflow_id), "step": run.step,
                         "job_id": run.job_id, "result_stored": row["first"].isoformat(),
                         "stores": row["stores"], **run.brief()})
    if not late:
        return []
    return [Violation("result_rerun", f"{len(late)} workflow step bodies ran after the "
                      "step's result was stored", late)]


async def check_workflows(dsn: str, expected: dict[uuid.UUID, int]) -> list[Violation]:
    """Every workflow completed and its ``total`` is the expected sum."""
    rows = await query(dsn, """
        SELECT w.id, w.state, w.settled_steps, w.total_steps, w.failed_steps,
               n.result -> 'value' AS total
        FROM baton.workflows AS w
        LEFT JOIN baton.nodes AS n ON n.workflow_id = w.id AND n.name = 'total'
        WHERE w.id = ANY(%s)""", (list(expected),))
    found = {r["id"]: r for r in rows}
    bad: list[dict[str, Any]] = []
    for wf_id, want in expected.items():
        row = found.get(wf_id)
        if row is None:
            bad.append({"workflow_id": str(wf_id), "problem": "missing"})
        elif row["state"] != "completed" or row["total"] != want:
            bad.append({"workflow_id": str(wf_id), "state": row["state"],
                        "settled": f"{row['settled_steps']}/{row['total_steps']}",
                        "failed_steps": row["failed_steps"], "total": row["total"],
                        "expected_total": want})
    if not bad:
        return []
    return [Violation("workflows", f"{len(bad)} workflow(s) did not complete with the right "
                      "result", bad)]


def check_subscriber(sub: Subscriber, workflow_ids: Iterable[uuid.UUID]) -> list[Violation]:
    """The subscriber saw each ``workflow_finished`` exactly once."""
    wanted = set(workflow_ids)
    missing = [str(w) for w in wanted if sub.finished[w] == 0]
    twice = [{"workflow_id": str(w), "seen": n} for w, n in sub.finished.items() if n > 1]
    out = []
    if missing:
        out.append(Violation(
            "events_missed", f"{len(missing)} of {len(wanted)} workflow_finished events never "
            f"reached the subscriber (its stream: {sub.error or 'still open'})", missing))
    if twice:
        out.append(Violation("events_twice",
                             f"{len(twice)} workflow_finished events were seen more than once",
                             twice))
    return out


def check_workers(cluster: Cluster, died: list[WorkerProc]) -> list[Violation]:
    """No worker process exited on its own."""
    if not died:
        return []
    return [Violation("worker_died", f"{len(died)} worker process(es) exited on their own",
                      [{"worker": w.name, "pid": w.pid, "status": w.proc.returncode,
                        "log": w.log_tail()} for w in died])]


# -- figures ------------------------------------------------------------------------------

def write_figures(scenario: str, figures: dict[str, Any]) -> None:
    """Keep the scenario's figures in ``last_run.json`` (one entry per scenario) and print
    them as one JSON line (seen with ``pytest -s``)."""
    try:
        data = json.loads(FIGURES.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[scenario] = figures
    FIGURES.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.write(json.dumps({"scenario": scenario, **figures}, default=str) + "\n")


def commit() -> str:
    """The commit under test (``FAULTS_COMMIT`` when the tree is a copy without git)."""
    if os.environ.get("FAULTS_COMMIT"):
        return os.environ["FAULTS_COMMIT"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "baton", "sql"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"{head}+wip" if head and dirty else head
