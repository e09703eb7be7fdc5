-- Room on each page of nodes for the updates a workflow step makes to its own row and to its
-- dependents' rows (its result, their count of dependencies left): none of those columns is
-- indexed, so with free space on the page the new version stays there (a HOT update) and no
-- index entry is written. Every statement is idempotent; {schema} is the quoted schema name.
--
-- Why: keeping the results of a 1 -> 10,000 -> 1 workflow's steps took 100 to 130 ms of
-- server time at fillfactor 70 against 185 ms at the default 100 (pg_stat_statements, runs
-- alternated on one machine).
--
-- Lock: SET (fillfactor) takes a brief SHARE UPDATE EXCLUSIVE lock and rewrites nothing;
-- pages written from now on keep the room, existing ones fill as they are.

-- migrate:up
ALTER TABLE {schema}.nodes SET (fillfactor = 70);

-- migrate:down
ALTER TABLE {schema}.nodes RESET (fillfactor);
