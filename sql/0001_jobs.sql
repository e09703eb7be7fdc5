-- Baton's queue: the jobs table, the worker registry and the leader lease.
-- Every statement is idempotent; {schema} is replaced by the quoted schema name.

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.jobs (
    id            bigserial PRIMARY KEY,
    state         text        NOT NULL DEFAULT 'available',
    queue         text        NOT NULL DEFAULT 'default',
    step          text        NOT NULL,
    args          jsonb       NOT NULL DEFAULT '{}',
    meta          jsonb       NOT NULL DEFAULT '{}',
    errors        jsonb       NOT NULL DEFAULT '[]',
    attempt       integer     NOT NULL DEFAULT 0,
    max_attempts  integer     NOT NULL DEFAULT 20,
    snoozes       integer     NOT NULL DEFAULT 0,
    priority      smallint    NOT NULL DEFAULT 0,
    timeout       double precision,
    workflow_id   uuid,
    workflow_step text,
    inserted_at   timestamptz NOT NULL DEFAULT now(),
    scheduled_at  timestamptz NOT NULL DEFAULT now(),
    attempted_at  timestamptz,
    attempted_by  text,
    finalized_at  timestamptz,
    CONSTRAINT jobs_state_check CHECK (state IN (
        'pending', 'scheduled', 'available', 'executing',
        'retryable', 'completed', 'discarded', 'cancelled')),
    CONSTRAINT jobs_attempt_range CHECK (attempt >= 0 AND attempt <= max_attempts),
    CONSTRAINT jobs_max_attempts_positive CHECK (max_attempts > 0),
    CONSTRAINT jobs_priority_range CHECK (priority BETWEEN 0 AND 9),
    CONSTRAINT jobs_queue_length CHECK (char_length(queue) BETWEEN 1 AND 128),
    CONSTRAINT jobs_finalized_when_final CHECK (
        (state IN ('completed', 'discarded', 'cancelled')) = (finalized_at IS NOT NULL))
) WITH (fillfactor = 90);

COMMENT ON TABLE {schema}.jobs IS
    'One row per job. state: pending (held workflow step), scheduled, available, executing, '
    'retryable, completed, discarded, cancelled.';

-- The fetch: available jobs of one queue in priority order.
CREATE INDEX IF NOT EXISTS jobs_fetch_idx
    ON {schema}.jobs (queue, priority, scheduled_at, id)
    WHERE state = 'available';

-- The stager: scheduled and retryable jobs that come due.
CREATE INDEX IF NOT EXISTS jobs_stage_idx
    ON {schema}.jobs (scheduled_at, id)
    WHERE state IN ('scheduled', 'retryable');

-- The rescuer: running jobs by the worker that holds them.
CREATE INDEX IF NOT EXISTS jobs_executing_idx
    ON {schema}.jobs (attempted_by)
    WHERE state = 'executing';

-- The pruner: finished jobs by age.
CREATE INDEX IF NOT EXISTS jobs_finalized_idx
    ON {schema}.jobs (finalized_at)
    WHERE finalized_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS jobs_workflow_idx
    ON {schema}.jobs (workflow_id)
    WHERE workflow_id IS NOT NULL;

-- Worker processes register here and heartbeat; a job executing on a worker whose
-- heartbeat expired is rescued.
CREATE TABLE IF NOT EXISTS {schema}.worker_registry (
    id            text        PRIMARY KEY,
    hostname      text        NOT NULL,
    pid           integer     NOT NULL,
    queues        jsonb       NOT NULL DEFAULT '{}',
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);

-- One row per elected role: whoever holds an unexpired lease runs maintenance.
CREATE TABLE IF NOT EXISTS {schema}.leader (
    name        text        PRIMARY KEY,
    leader_id   text        NOT NULL,
    elected_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- migrate:down
DROP TABLE IF EXISTS {schema}.leader;
DROP TABLE IF EXISTS {schema}.worker_registry;
DROP TABLE IF EXISTS {schema}.jobs;
