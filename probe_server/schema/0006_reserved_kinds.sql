-- Reserved: schema 6 belongs to the speed-test and tool experiment kinds
-- (issue 11), developed on another branch. This placeholder only keeps the
-- scripts numbered 1..n here; merging that branch replaces it with its
-- 0006_kinds.sql (delete this file then). A development database migrated
-- to version 7 on this branch has skipped the kinds' script and needs it
-- applied by hand.
SELECT 1;
