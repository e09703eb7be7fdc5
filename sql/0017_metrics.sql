-- Metrics: counters that only grow (jobs finished, failures, retries, workflow outcomes,
-- LLM tokens and cost), kept so that a scrape never reads the finished rows of the past.
-- Every statement is idempotent; {schema} is the quoted schema name.
--
-- A scrape or the maintenance leader advances each source's watermark: it adds what the
-- rows finished in [counted_until, horizon) amount to into metrics_counters and moves
-- counted_until to the horizon, reading those rows through the indexes on jobs.finalized_at,
-- workflows.finished_at and step_stats.inserted_at. A scrape then reports the counters plus
-- what the rows past the watermark add (the same reads, from the watermark on), so the
-- numbers are current and each scrape reads only the rows finished since the last advance.
-- Nothing is written when a job finishes: the finishing paths are untouched.
--
-- The counters start at zero when this migration runs: rows finished before it are not
-- counted (reading them all would be the full scan this design avoids).

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.metrics_counters (
    name   text    NOT NULL,
    labels jsonb   NOT NULL DEFAULT '{}',
    value  numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (name, labels)
);

COMMENT ON TABLE {schema}.metrics_counters IS
    'Running totals behind the Prometheus counters (baton.metrics), one row per name and '
    'label set, as counted up to metrics_sources.counted_until. Only ever added to; pruning '
    'finished rows does not lower them.';
COMMENT ON COLUMN {schema}.metrics_counters.labels IS
    'The label values, e.g. {"queue": "default", "step": "send", "state": "completed"}.';

CREATE TABLE IF NOT EXISTS {schema}.metrics_sources (
    source        text        PRIMARY KEY,
    counted_until timestamptz NOT NULL,
    advanced_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT metrics_sources_known CHECK (source IN ('jobs', 'workflows', 'step_stats'))
);

COMMENT ON TABLE {schema}.metrics_sources IS
    'The watermark of each table the counters are read from: rows finished (jobs.finalized_at, '
    'workflows.finished_at, step_stats.inserted_at) before counted_until are in '
    'metrics_counters; later ones are read at each scrape until an advance counts them.';

INSERT INTO {schema}.metrics_sources (source, counted_until)
VALUES ('jobs', now()), ('workflows', now()), ('step_stats', now())
ON CONFLICT (source) DO NOTHING;

-- migrate:down
DROP TABLE IF EXISTS {schema}.metrics_sources;
DROP TABLE IF EXISTS {schema}.metrics_counters;
