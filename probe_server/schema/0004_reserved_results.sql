-- Placeholder: schema version 4 is reserved for the results/report tables,
-- built on another branch. Migrations must be numbered 1..n, so this branch
-- carries an empty script in its place; the results branch's 0004 replaces it.
SELECT 1;
