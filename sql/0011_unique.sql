-- Unique jobs and workflows: a row may carry a key that no other row holds while both are
-- in the row's counted states. Every statement is idempotent; {schema} is the quoted schema.
--
-- The key is enforced by a partial unique index whose predicate reads the row's own
-- states, so a row that leaves them (a job that finishes, a workflow that ends) drops out
-- of the index by itself: no statement clears a key, and ordinary rows (both columns NULL)
-- are never in the index. What that costs an ordinary job: a predicate evaluated (false at
-- its first term) when it is inserted and when its state changes, below what the
-- server's CPU clock shows for 10,000 inserted rows (docs/unique.md); two NULL columns
-- take no space (the rows already have a null bitmap).
--
-- Lock: ADD COLUMN without a default only changes the catalog (a brief ACCESS EXCLUSIVE
-- lock). CREATE INDEX CONCURRENTLY cannot run inside a transaction, and baton/migrations.py
-- runs each file in one, so the indexes are built plainly: that holds a SHARE lock (inserts
-- and updates wait, reads go on) for one sequential read of the table. The columns are new
-- and all NULL, so no row enters the index and nothing is sorted or written: on this
-- project's 2-core machine the jobs index took 0.13 s for a million rows (177 MB)
-- in cache; from disk it costs one read of the table. A deployment
-- with a very large jobs table can build the same index CONCURRENTLY by hand first; the
-- IF NOT EXISTS below then finds it.

-- migrate:up
ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS unique_key text;
ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS unique_states text[];

COMMENT ON COLUMN {schema}.jobs.unique_key IS
    'A unique job''s key (baton.Unique): a digest of its step, queue and chosen args, '
    'followed by its period number when it has a period. NULL for ordinary jobs.';
COMMENT ON COLUMN {schema}.jobs.unique_states IS
    'The states in which the job holds unique_key: while it is in one, no other job in '
    'one of its own states may have the same key.';

CREATE UNIQUE INDEX IF NOT EXISTS jobs_unique_key_idx
    ON {schema}.jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state = ANY(unique_states);

ALTER TABLE {schema}.workflows ADD COLUMN IF NOT EXISTS unique_key text;
ALTER TABLE {schema}.workflows ADD COLUMN IF NOT EXISTS unique_states text[];

COMMENT ON COLUMN {schema}.workflows.unique_key IS
    'A unique workflow''s key (Workflow(unique=...)): a digest of its label (and steps), '
    'followed by its period number when it has a period. NULL for ordinary workflows.';
COMMENT ON COLUMN {schema}.workflows.unique_states IS
    'The states in which the workflow holds unique_key (by default: running).';

CREATE UNIQUE INDEX IF NOT EXISTS workflows_unique_key_idx
    ON {schema}.workflows (unique_key)
    WHERE unique_key IS NOT NULL AND state = ANY(unique_states);

-- migrate:down
DROP INDEX IF EXISTS {schema}.workflows_unique_key_idx;
ALTER TABLE {schema}.workflows DROP COLUMN IF EXISTS unique_states;
ALTER TABLE {schema}.workflows DROP COLUMN IF EXISTS unique_key;
DROP INDEX IF EXISTS {schema}.jobs_unique_key_idx;
ALTER TABLE {schema}.jobs DROP COLUMN IF EXISTS unique_states;
ALTER TABLE {schema}.jobs DROP COLUMN IF EXISTS unique_key;
