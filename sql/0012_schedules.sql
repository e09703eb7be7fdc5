-- Periodic jobs: one row per schedule (a cron expression in a time zone and the job it
-- enqueues). Workers that define a schedule write its row when they start and renew
-- live_until while they live; the elected leader enqueues each tick once, moving next_tick
-- on in the same statement that inserts the job.

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.schedules (
    name          text        PRIMARY KEY,
    cron          text        NOT NULL,
    timezone      text        NOT NULL,
    step          text        NOT NULL,
    queue         text        NOT NULL,
    args          jsonb       NOT NULL DEFAULT '{}',
    meta          jsonb       NOT NULL DEFAULT '{}',
    max_attempts  integer     NOT NULL,
    priority      smallint    NOT NULL,
    timeout       double precision,
    tags          text[]      NOT NULL DEFAULT '{}',
    unique_key    text,
    unique_period double precision,
    unique_states text[],
    next_tick     timestamptz,
    last_tick     timestamptz,
    last_job_id   bigint,
    ticked_at     timestamptz,
    defined_at    timestamptz NOT NULL DEFAULT now(),
    seen_at       timestamptz NOT NULL DEFAULT now(),
    live_until    timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE {schema}.schedules IS
    'Periodic jobs. The leader enqueues a job when next_tick has passed; when several ticks '
    'passed without a leader, only the latest is enqueued, once, late (its job''s meta says '
    'missed_since). A schedule ticks while a live worker defines it (live_until).';
COMMENT ON COLUMN {schema}.schedules.cron IS
    'Five fields (minute hour day-of-month month day-of-week), or six with seconds first.';
COMMENT ON COLUMN {schema}.schedules.timezone IS
    'The IANA time zone the cron expression is read in (its ticks follow daylight saving).';
COMMENT ON COLUMN {schema}.schedules.unique_key IS
    'A unique job''s key without its period (baton.Unique, migration 11): a tick whose job '
    'finds the key held (the last run unfinished, say) enqueues nothing.';
COMMENT ON COLUMN {schema}.schedules.next_tick IS
    'The earliest tick not yet enqueued; NULL when the expression never matches again. '
    'Reset to the next tick from now when the expression or time zone changes.';
COMMENT ON COLUMN {schema}.schedules.last_tick IS 'The latest tick enqueued.';
COMMENT ON COLUMN {schema}.schedules.last_job_id IS 'The job enqueued for last_tick.';
COMMENT ON COLUMN {schema}.schedules.ticked_at IS 'When last_tick was enqueued.';
COMMENT ON COLUMN {schema}.schedules.seen_at IS
    'When a worker that defines the schedule last renewed it.';
COMMENT ON COLUMN {schema}.schedules.live_until IS
    'Pushed on by every live worker that defines the schedule (its heartbeat_ttl ahead); the '
    'leader skips a schedule past it (one removed from the code stops ticking).';

-- migrate:down
DROP TABLE IF EXISTS {schema}.schedules;
