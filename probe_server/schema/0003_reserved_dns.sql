-- Placeholder: schema version 3 is reserved for the DNS tables, built on
-- another branch. Migrations must be numbered 1..n, so this branch carries an
-- empty script in its place; the DNS branch's 0003 script replaces it.
SELECT 1;
