-- Experiment structure shared by the MTurk requester side and the reports:
-- batches (one reward, one set of countries), the HITs published for them,
-- and the assignments MTurk reports back. Sessions join to a batch through
-- their hitId; a session without a known HIT keeps its URL/config label.

CREATE TABLE batches (
    name        TEXT PRIMARY KEY,
    experiment  TEXT    NOT NULL DEFAULT '',
    reward      TEXT,                 -- dollars as a decimal string, e.g. '0.05'
    countries   TEXT    NOT NULL DEFAULT '',  -- ISO 3166 alpha-2 codes, space separated
    assignments INTEGER,              -- assignments asked for across the batch's HITs
    sandbox     INTEGER NOT NULL DEFAULT 1,
    published   REAL,                 -- when its HITs became assignable
    expired     REAL                  -- when it was expired early, if it was
);

CREATE TABLE hits (
    hit_id      TEXT PRIMARY KEY,
    batch       TEXT    NOT NULL REFERENCES batches (name),
    hit_type_id TEXT,
    max_assignments INTEGER NOT NULL,
    created     REAL    NOT NULL,
    expires     REAL
);
CREATE INDEX hits_batch ON hits (batch);

CREATE TABLE assignments (
    assignment_id TEXT PRIMARY KEY,
    hit_id        TEXT NOT NULL,
    worker_id     TEXT NOT NULL,
    status        TEXT NOT NULL,      -- Submitted, Approved, Rejected
    accept_time   REAL,
    submit_time   REAL,
    review_time   REAL,               -- approval or rejection time
    answers       TEXT,               -- JSON object: QuestionIdentifier -> FreeText
    synced        REAL NOT NULL       -- when this row was last refreshed from MTurk
);
CREATE INDEX assignments_hit ON assignments (hit_id);
CREATE INDEX assignments_worker ON assignments (worker_id);

-- The batch each session belongs to: its HIT's batch, else its label.
CREATE VIEW session_batch AS
SELECT s.id AS session_id,
       s.token AS session_token,
       COALESCE(h.batch, NULLIF(s.batch, '')) AS batch
FROM sessions s
LEFT JOIN hits h ON h.hit_id = s.hit_id;
