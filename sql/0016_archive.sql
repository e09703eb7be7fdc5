-- The jobs archive: finished plain jobs leave the hot jobs table for a table partitioned by
-- the day they finished (UTC), so the table that workers insert into, claim from and update
-- stays small however long the history is kept, and old history goes by dropping a
-- partition instead of deleting row by row. Every statement is idempotent; {schema} is
-- the quoted schema name.
--
-- Why: with ten million finished rows in jobs, every page of that history keeps some free
-- space, so each new job lands in a different old page: batch enqueue ran at a third of
-- its speed on an empty table and the drain at two thirds (docs/retention.md,
-- benchmarks/bigtable.py).
--
-- Lock: this file only creates new objects (the archive, its indexes while it is empty,
-- two functions and a view). It takes no lock on jobs beyond the view's brief reference,
-- so it runs on a live install of any size. Rows move afterwards, in batches, by the
-- maintenance leader (jobs_archive_move), each batch one short transaction.
--
-- A later migration that adds a column to jobs adds it to jobs_archive too, and to the
-- queries of baton/queries/archive.sql and job_retry, and replaces jobs_all.

-- migrate:up
CREATE TABLE IF NOT EXISTS {schema}.jobs_archive (
    id              bigint      NOT NULL,
    state           text        NOT NULL,
    queue           text        NOT NULL,
    step            text        NOT NULL,
    args            jsonb       NOT NULL,
    meta            jsonb       NOT NULL,
    errors          jsonb       NOT NULL,
    attempt         integer     NOT NULL,
    max_attempts    integer     NOT NULL,
    snoozes         integer     NOT NULL,
    priority        smallint    NOT NULL,
    timeout         double precision,
    workflow_id     uuid,
    workflow_step   text,
    inserted_at     timestamptz NOT NULL,
    scheduled_at    timestamptz NOT NULL,
    attempted_at    timestamptz,
    attempted_by    text,
    finalized_at    timestamptz NOT NULL,
    idempotency_key text,
    tags            text[]      NOT NULL DEFAULT '{}',
    unique_key      text,
    unique_states   text[],
    archived_at     timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (finalized_at);

COMMENT ON TABLE {schema}.jobs_archive IS
    'Finished plain jobs moved out of jobs by the maintenance leader once older than '
    'archive_after, one partition per UTC day of finalized_at (jobs_archive_YYYYMMDD), '
    'dropped whole by retention (prune_after). Read both tables through the jobs_all view.';

-- Partitioned indexes: each new partition gets its own, built while it is empty.
CREATE INDEX IF NOT EXISTS jobs_archive_id_idx ON {schema}.jobs_archive (id);
-- The newest archived job, where a new leader's first pass starts looking in jobs.
CREATE INDEX IF NOT EXISTS jobs_archive_finalized_idx ON {schema}.jobs_archive (finalized_at);
CREATE INDEX IF NOT EXISTS jobs_archive_tags_idx
    ON {schema}.jobs_archive USING gin (tags)
    WHERE tags <> '{}';

-- The partition for the UTC day of `at`, created if missing; returns the end of that day
-- (the partition's upper bound). Creating one briefly locks the archive (once a day).
CREATE OR REPLACE FUNCTION {schema}.jobs_archive_partition(at timestamptz)
RETURNS timestamptz LANGUAGE plpgsql AS $$
DECLARE
    day  date := (at AT TIME ZONE 'UTC')::date;
    part text := 'jobs_archive_' || to_char(day, 'YYYYMMDD');
    low  timestamptz := day::timestamp AT TIME ZONE 'UTC';
    high timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(format('%s.%I', '{schema}', part)) IS NULL THEN
        EXECUTE format('CREATE TABLE IF NOT EXISTS %s.%I PARTITION OF %s.jobs_archive '
                       'FOR VALUES FROM (%L) TO (%L)', '{schema}', part, '{schema}', low, high);
    END IF;
    RETURN high;
END
$$;

-- Drop the archive's partitions that end at or before `before`, with the kept results of
-- their jobs; returns the names dropped. Waits at most `wait` for the archive's lock (a long
-- read of the archive holds it): past that it raises, and the next pass tries again.
CREATE OR REPLACE FUNCTION {schema}.jobs_archive_drop(before timestamptz, wait interval)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    part text;
BEGIN
    PERFORM set_config('lock_timeout', (extract(epoch FROM wait) * 1000)::bigint::text, true);
    FOR part IN
        SELECT c.relname
        FROM pg_inherits AS i
        JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = to_regclass(format('%s.jobs_archive', '{schema}'))
          AND c.relname ~ '^jobs_archive_[0-9]{8}$'
          AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
              <= before
        ORDER BY c.relname
    LOOP
        EXECUTE format('DELETE FROM %s.job_results AS r USING %s.%I AS a WHERE r.job_id = a.id',
                       '{schema}', '{schema}', part);
        EXECUTE format('DROP TABLE %s.%I', '{schema}', part);
        RETURN NEXT part;
    END LOOP;
END
$$;

-- Every job, hot or archived: what a person querying by hand (and baton's reads of one job
-- or a listing) should read.
CREATE OR REPLACE VIEW {schema}.jobs_all AS
SELECT id, state, queue, step, args, meta, errors, attempt, max_attempts, snoozes, priority,
    timeout, workflow_id, workflow_step, inserted_at, scheduled_at, attempted_at,
    attempted_by, finalized_at, idempotency_key, tags, unique_key, unique_states,
    false AS archived
FROM {schema}.jobs
UNION ALL
SELECT id, state, queue, step, args, meta, errors, attempt, max_attempts, snoozes, priority,
    timeout, workflow_id, workflow_step, inserted_at, scheduled_at, attempted_at,
    attempted_by, finalized_at, idempotency_key, tags, unique_key, unique_states,
    true AS archived
FROM {schema}.jobs_archive;

COMMENT ON VIEW {schema}.jobs_all IS
    'Every job: the hot jobs table and the archive of finished plain jobs (archived = true).';

-- migrate:down
-- Archived jobs go back to jobs first, so reverting loses none.
INSERT INTO {schema}.jobs (
    id, state, queue, step, args, meta, errors, attempt, max_attempts, snoozes, priority,
    timeout, workflow_id, workflow_step, inserted_at, scheduled_at, attempted_at,
    attempted_by, finalized_at, idempotency_key, tags, unique_key, unique_states)
SELECT id, state, queue, step, args, meta, errors, attempt, max_attempts, snoozes, priority,
    timeout, workflow_id, workflow_step, inserted_at, scheduled_at, attempted_at,
    attempted_by, finalized_at, idempotency_key, tags, unique_key, unique_states
FROM {schema}.jobs_archive
ON CONFLICT (id) DO NOTHING;
DROP VIEW IF EXISTS {schema}.jobs_all;
DROP FUNCTION IF EXISTS {schema}.jobs_archive_drop(timestamptz, interval);
DROP FUNCTION IF EXISTS {schema}.jobs_archive_partition(timestamptz);
DROP TABLE IF EXISTS {schema}.jobs_archive;
