-- Room on each page of nodes for the updates a workflow step makes to its own row and to its
-- dependents' rows (its result, their count of dependencies left): none of those columns is
-- indexed, so with free space on the page the new version stays there (a HOT update) and no
-- index entry is written. Every row is updated at least twice, often all the rows of a page
-- at once (a settlement that releases thousands of dependents), so half of each page is
-- kept free. Every statement is idempotent; {schema} is the quoted schema name.
--
-- Why: the settlement that releases the 10,000 children of a 1 -> 10,000 -> 1 workflow took
-- 303 ms at fillfactor 70 (two thirds of its node updates not HOT) and 178 ms at 50 (all
-- HOT), EXPLAIN ANALYZE on the same rows; keeping that workflow's results took 185 ms of
-- server time at the default 100 and 100 to 130 ms with room left (pg_stat_statements).
--
-- Lock: SET (fillfactor) takes a brief SHARE UPDATE EXCLUSIVE lock and rewrites nothing;
-- pages written from now on keep the room, existing ones fill as they are.

-- migrate:up
ALTER TABLE {schema}.nodes SET (fillfactor = 50);

-- migrate:down
ALTER TABLE {schema}.nodes RESET (fillfactor);
