-- Rollups: what `probe-server report` needs of the append-only request log,
-- kept up to date incrementally (probe_server/analysis/rollup.py), so a
-- report on a million sessions reads a few narrow tables instead of joining
-- millions of rows. Filled by the report's enrichment step, never by the
-- server: its inserts carry no trigger.
--
-- Each rollup covers exactly the rows of sessions, requests and answers up
-- to the ids in rollup_state (a pair of rows, e.g. a request and its session,
-- counts once both are covered). Those three tables are append-only; a row
-- deleted or changed by hand empties rollup_state (triggers below), and the
-- next report builds the rollups again from scratch. What can change in
-- place (GeoIP answers, classes, HITs, batches) is joined when the report
-- reads, or compared on every refresh; MTurk's submit times are copied by
-- triggers on assignments. The report_* views of 0004 still read the raw
-- tables, so they stay live between reports.

-- How far each rollup has got: 'sessions', 'requests', 'answers' up to id
-- `through`. No row: nothing is rolled up (the tables below are emptied).
CREATE TABLE rollup_state (
    source  TEXT PRIMARY KEY,
    through INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per IPv4 address that loaded the survey: its sessions by visit.
CREATE TABLE rollup_ipv4 (
    ipv4     TEXT PRIMARY KEY,
    sessions INTEGER NOT NULL,
    previews INTEGER NOT NULL,
    accepted INTEGER NOT NULL
) WITHOUT ROWID;

-- Each IPv6 address that fetched a blue ball (verified token, status 200)
-- with the IPv4 address of each session it fetched for.
CREATE TABLE rollup_blue (
    ipv6 TEXT NOT NULL,
    ipv4 TEXT NOT NULL,
    PRIMARY KEY (ipv6, ipv4)
) WITHOUT ROWID;

-- Counters: 'sessions preview|accepted|direct', 'requests' (all),
-- 'requests signed' (token_ok = 1), 'requests preview|direct' (signed
-- requests of preview and direct sessions): report_previews' numbers.
CREATE TABLE rollup_counts (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- The first session carrying each batch label: where report_completions
-- counts hours from when a batch has no publication time. (The first
-- session of each HIT of an unpublished batch is looked up when compared:
-- HITs are published with their batch, so there are few such sessions.)
CREATE TABLE rollup_labels (
    label   TEXT PRIMARY KEY,
    created REAL NOT NULL
) WITHOUT ROWID;

-- The HITs and the batches (report_completions' batch_info_start) as of
-- the last refresh; a refresh that finds them changed recomputes the
-- completions they touch.
CREATE TABLE rollup_hits (
    hit_id TEXT PRIMARY KEY,
    batch  TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE rollup_batches (
    batch     TEXT PRIMARY KEY,
    reward    TEXT,
    countries TEXT,
    start     REAL
) WITHOUT ROWID;

-- One row per completed HIT that answered (report_completions' `answered`):
-- key 'a:' || assignment_id for an accepted assignment (the session that
-- answered first among its sessions), else 't:' || the session's token.
-- Completions MTurk reports submitted without an answer are found when the
-- report reads (few, and they follow assignments, which change in place).
CREATE TABLE rollup_completions (
    key           TEXT PRIMARY KEY,
    answer_id     INTEGER NOT NULL,  -- the first answer; a smaller one replaces the row
    hit_id        TEXT,
    label         TEXT NOT NULL,     -- sessions.batch
    ipv4          TEXT NOT NULL,
    answered_at   REAL NOT NULL,
    correct       INTEGER NOT NULL,
    batch         TEXT,              -- the session_batch rule, from rollup_hits
    batch_country TEXT,              -- the batch's one target country, if it has one
    start         REAL,              -- rollup_batches.start
    submit_time   REAL,              -- MTurk's, kept by the triggers on assignments
    -- Since the batch's start, as report_completions counts them; kept by
    -- rollup_completions_hours. Plain columns, not generated ones: SQLite
    -- reads an index on a generated column only together with the table.
    hours         REAL,
    minute        INTEGER
) WITHOUT ROWID;
-- Table 3 and Figure 2 group completions by country, batch and minute: this
-- index hands them over in that order, so no sort is needed. Completions
-- located by GeoIP (no single target country) are the NULL batch_country
-- range, grouped with their GeoIP answer when read.
CREATE INDEX rollup_completions_groups
ON rollup_completions (batch_country, batch, minute, hours, correct, ipv4);

-- report_completions' hours and Figure 2's minute, whenever what they come
-- from changes (rows are inserted with them).
CREATE TRIGGER rollup_completions_hours
AFTER UPDATE OF answered_at, submit_time, start ON rollup_completions
BEGIN
    UPDATE rollup_completions
    SET hours = (COALESCE(submit_time, answered_at) - start) / 3600.0,
        minute = CAST((COALESCE(submit_time, answered_at) - start) / 3600.0 * 60 AS INTEGER)
                 - ((COALESCE(submit_time, answered_at) - start) / 3600.0 < 0)
    WHERE key = NEW.key;
END;

-- Answers by session with what a completion needs of them: the rollups find
-- each session's first answer in the index alone, in token order, instead
-- of fetching half a million answer rows at random places. Same name and
-- leading columns as schema 1's index, so every query it served it serves.
DROP INDEX answers_session;
CREATE INDEX answers_session ON answers (session_token, id, t, red_correct);

-- MTurk's submit time, copied into the completion of its assignment.
CREATE TRIGGER rollup_assignment_inserted AFTER INSERT ON assignments
BEGIN
    UPDATE rollup_completions SET submit_time = NEW.submit_time
    WHERE key = 'a:' || NEW.assignment_id;
END;
CREATE TRIGGER rollup_assignment_updated AFTER UPDATE OF assignment_id, submit_time ON assignments
BEGIN
    UPDATE rollup_completions SET submit_time = NULL WHERE key = 'a:' || OLD.assignment_id;
    UPDATE rollup_completions SET submit_time = NEW.submit_time
    WHERE key = 'a:' || NEW.assignment_id;
END;
CREATE TRIGGER rollup_assignment_deleted AFTER DELETE ON assignments
BEGIN
    UPDATE rollup_completions SET submit_time = NULL WHERE key = 'a:' || OLD.assignment_id;
END;

-- The server only ever inserts into these three; a row deleted or changed
-- by hand makes the next report roll everything up again.
CREATE TRIGGER rollup_sessions_deleted AFTER DELETE ON sessions
BEGIN
    DELETE FROM rollup_state;
END;
CREATE TRIGGER rollup_sessions_updated AFTER UPDATE ON sessions
BEGIN
    DELETE FROM rollup_state;
END;
CREATE TRIGGER rollup_requests_deleted AFTER DELETE ON requests
BEGIN
    DELETE FROM rollup_state;
END;
CREATE TRIGGER rollup_requests_updated AFTER UPDATE ON requests
BEGIN
    DELETE FROM rollup_state;
END;
CREATE TRIGGER rollup_answers_deleted AFTER DELETE ON answers
BEGIN
    DELETE FROM rollup_state;
END;
CREATE TRIGGER rollup_answers_updated AFTER UPDATE ON answers
BEGIN
    DELETE FROM rollup_state;
END;
