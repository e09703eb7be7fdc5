-- Queue limits: how many jobs of a queue may run at once across every worker, how many may
-- start per window of time and how many recorded tokens a window may use, optionally per
-- partition (a key of the jobs' args, such as a customer). Workers enforce them in the
-- fetch: a queue with a row here is claimed by the limited fetch, one claim at a time.

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.queue_limits (
    queue         text             PRIMARY KEY,
    concurrency   integer          CHECK (concurrency >= 1),
    total_concurrency integer      CHECK (total_concurrency >= 1),
    rate_limit    integer          CHECK (rate_limit >= 1),
    rate_period   double precision CHECK (rate_period > 0),
    token_limit   bigint           CHECK (token_limit >= 1),
    token_period  double precision CHECK (token_period > 0),
    partition_by  text             CHECK (char_length(partition_by) BETWEEN 1 AND 128),
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT queue_limits_rate_pair CHECK ((rate_limit IS NULL) = (rate_period IS NULL)),
    CONSTRAINT queue_limits_token_pair CHECK ((token_limit IS NULL) = (token_period IS NULL)),
    CONSTRAINT queue_limits_some CHECK (
        concurrency IS NOT NULL OR total_concurrency IS NOT NULL OR rate_limit IS NOT NULL
        OR token_limit IS NOT NULL),
    CONSTRAINT queue_limits_total_partitioned CHECK (
        total_concurrency IS NULL OR partition_by IS NOT NULL)
);

COMMENT ON TABLE {schema}.queue_limits IS
    'Limits of a queue across all workers, enforced when jobs are fetched. Change them with '
    'app.limit_queue or `baton queue limit` so that running workers are told at once.';
COMMENT ON COLUMN {schema}.queue_limits.concurrency IS
    'The most jobs of the queue (of each partition) executing at once; NULL: no such limit.';
COMMENT ON COLUMN {schema}.queue_limits.total_concurrency IS
    'With partition_by: the most jobs of the whole queue executing at once, whatever their '
    'partition; NULL: no such limit.';
COMMENT ON COLUMN {schema}.queue_limits.rate_limit IS
    'The most jobs of the queue (of each partition) started in any rate_period seconds.';
COMMENT ON COLUMN {schema}.queue_limits.token_limit IS
    'No job of the queue (of a partition) starts while its jobs recorded this many tokens '
    '(input + output, in step_stats) in the last token_period seconds.';
COMMENT ON COLUMN {schema}.queue_limits.partition_by IS
    'A key of the jobs'' args: every limit applies to each value of it on its own (jobs '
    'without the key share one partition). NULL: the limits apply to the whole queue.';

-- The starts of rate-limited queues in their current window, one row per claim and
-- partition; the limited fetch adds its own and deletes those older than the window.
CREATE TABLE IF NOT EXISTS {schema}.queue_limit_starts (
    queue          text        NOT NULL,
    partition_key  text        NOT NULL,
    started_at     timestamptz NOT NULL,
    jobs           integer     NOT NULL CHECK (jobs >= 1)
);

CREATE INDEX IF NOT EXISTS queue_limit_starts_idx
    ON {schema}.queue_limit_starts (queue, started_at);

COMMENT ON TABLE {schema}.queue_limit_starts IS
    'Jobs started by the limited fetch of rate-limited queues, per claim and partition, '
    'kept for the length of the rate window.';

-- migrate:down
DROP TABLE IF EXISTS {schema}.queue_limit_starts;
DROP TABLE IF EXISTS {schema}.queue_limits;
