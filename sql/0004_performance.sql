-- Indexes and storage settings found by the benchmarks.

-- migrate:up
-- The gate reads a step's dependencies by (workflow, node); the primary key serves
-- (workflow, dep), the direction completion takes.
CREATE INDEX IF NOT EXISTS edges_node_idx ON {schema}.edges (workflow_id, node);

-- Every job changes state at least twice: vacuum the table early so the fetch index does
-- not fill with entries of rows that left it.
ALTER TABLE {schema}.jobs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 1
);

-- migrate:down
ALTER TABLE {schema}.jobs RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_insert_scale_factor,
    autovacuum_analyze_scale_factor,
    autovacuum_vacuum_cost_delay
);
DROP INDEX IF EXISTS {schema}.edges_node_idx;
