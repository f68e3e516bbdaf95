-- Reserved: schema 6 belongs to the speed-test and tool experiment kinds
-- (issue 11), developed on another branch. This placeholder keeps the
-- scripts numbered 1..n here; the merge replaces it with theirs. A database
-- migrated past it is handled like the results placeholder was (see
-- probe_server/analysis/geo.py, ensure_schema).
SELECT 1;
