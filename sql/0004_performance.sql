-- Storage settings found by the benchmarks.

-- migrate:up
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
