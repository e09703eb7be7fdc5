-- Kept results of plain jobs, in a table of their own so the jobs table stays narrow, and
-- tags on jobs. Every statement is idempotent; {schema} is the quoted schema name.

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.job_results (
    job_id   bigint      PRIMARY KEY,
    result   jsonb       NOT NULL,
    kept_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE {schema}.job_results IS
    'The return value (JSON) of each completed plain job whose step keeps its result '
    '(@app.step(keep_result=True)); written with the completion, pruned with the job. '
    'Workflow steps keep theirs in nodes.result.';

ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS tags text[] NOT NULL DEFAULT '{}';

COMMENT ON COLUMN {schema}.jobs.tags IS
    'Labels given by the step or the job (@app.step(tags=...), job.options(tags=...)); '
    'filter with tags @> ARRAY[...]. Only tagged jobs are in jobs_tags_idx.';

-- Only tagged jobs are indexed, so an untagged insert pays for the predicate alone; a query
-- uses it when it says `tags <> '{}'` beside its `tags @> ...`.
-- Lock: built inside the migration's transaction (CONCURRENTLY cannot be), it holds a SHARE
-- lock (inserts and updates wait, reads go on) for one read of jobs; every row has just got
-- the empty default, so none enters the index. A deployment with a very large jobs table
-- can build the same index CONCURRENTLY by hand first; IF NOT EXISTS then finds it.
CREATE INDEX IF NOT EXISTS jobs_tags_idx
    ON {schema}.jobs USING gin (tags)
    WHERE tags <> '{}';

-- migrate:down
DROP INDEX IF EXISTS {schema}.jobs_tags_idx;
ALTER TABLE {schema}.jobs DROP COLUMN IF EXISTS tags;
DROP TABLE IF EXISTS {schema}.job_results;
