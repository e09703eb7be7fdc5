-- Queue control: a queue can be paused (its jobs are kept but not fetched) and scaled (the
-- number of its jobs each worker runs at once). Workers read this table when they start and
-- every heartbeat, and obey a change at once when it is announced on the control channel.

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.queues (
    name         text        PRIMARY KEY,
    paused       boolean     NOT NULL DEFAULT false,
    concurrency  integer     CHECK (concurrency >= 1),
    version      bigint      NOT NULL DEFAULT 1,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE {schema}.queues IS
    'Control settings of queues, one row per queue that was ever paused, resumed or scaled '
    '(a queue without a row runs, at each worker''s own concurrency). Change it with '
    '`baton queue pause|resume|scale` so that running workers are told; never delete a row '
    'by hand, resume the queue instead.';
COMMENT ON COLUMN {schema}.queues.paused IS
    'Workers fetch no job of a paused queue; its jobs keep being accepted and wait.';
COMMENT ON COLUMN {schema}.queues.concurrency IS
    'How many jobs of the queue each worker serving it runs at once; NULL: each worker''s '
    'own setting (`baton worker --queues`).';
COMMENT ON COLUMN {schema}.queues.version IS
    'Grows by one with every change: a worker ignores a setting older than one it has.';

-- migrate:down
DROP TABLE IF EXISTS {schema}.queues;
