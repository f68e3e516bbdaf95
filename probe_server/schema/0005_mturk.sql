-- The MTurk requester side (probe-server hits ...): what was asked of MTurk
-- and what was decided, so that publishing is idempotent, exclusion can be
-- granted once per worker, and every review decision can be audited.

-- 1 when the batch's HITs keep out workers of the experiment's other batches.
ALTER TABLE batches ADD COLUMN exclude_other_batches INTEGER NOT NULL DEFAULT 0;
-- PercentAssignmentsApproved required, if any.
ALTER TABLE batches ADD COLUMN min_approval_rate INTEGER;
-- Most assignments per HIT: the batch's size, or 9 when split to pay 20%.
ALTER TABLE batches ADD COLUMN hit_size INTEGER;

-- Which endpoint the HIT lives on, the n-th HIT of its batch, the
-- UniqueRequestToken that created it, and what it was published with.
ALTER TABLE hits ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 1;
ALTER TABLE hits ADD COLUMN hit_index INTEGER;
ALTER TABLE hits ADD COLUMN request_token TEXT;
ALTER TABLE hits ADD COLUMN reward TEXT;
ALTER TABLE hits ADD COLUMN hit_group_id TEXT;
ALTER TABLE hits ADD COLUMN qualification_requirements TEXT;  -- JSON, as sent
CREATE UNIQUE INDEX hits_batch_index ON hits (batch, hit_index);

-- The qualification type of each batch of an experiment file ("took part in
-- this batch"): granted to the batch's workers at sync, and required with
-- DoesNotExist by the HITs that keep them out. It exists from the first
-- publish of any batch of the experiment, before the batch itself may be.
CREATE TABLE batch_qualifications (
    batch                 TEXT    PRIMARY KEY,
    experiment            TEXT    NOT NULL,
    sandbox               INTEGER NOT NULL,
    qualification_type_id TEXT    NOT NULL,
    name                  TEXT    NOT NULL,
    created               REAL    NOT NULL
);

-- Qualifications granted to workers (exclusion), so each is granted once.
CREATE TABLE qualification_grants (
    qualification_type_id TEXT NOT NULL,
    worker_id             TEXT NOT NULL,
    batch                 TEXT NOT NULL,
    granted               REAL NOT NULL,
    PRIMARY KEY (qualification_type_id, worker_id)
);

-- Every review decision: the evidence, what was decided, and whether MTurk
-- took it (done set) or refused it (error set).
CREATE TABLE reviews (
    id             INTEGER PRIMARY KEY,
    assignment_id  TEXT    NOT NULL,
    decision       TEXT    NOT NULL CHECK (decision IN ('approve', 'reject')),
    reason         TEXT    NOT NULL,
    session_token  TEXT,
    red_expected   INTEGER,
    red_reported   INTEGER,
    feedback       TEXT,
    decided        REAL    NOT NULL,
    done           REAL,
    error          TEXT
);
CREATE INDEX reviews_assignment ON reviews (assignment_id);

-- The session each assignment answered: the token our answer page handed on
-- to MTurk with the answers.
CREATE VIEW assignment_session AS
SELECT a.assignment_id,
       a.hit_id,
       a.worker_id,
       a.status,
       json_extract(a.answers, '$.token') AS session_token,
       s.id AS session_id
FROM assignments a
LEFT JOIN sessions s ON s.token = json_extract(a.answers, '$.token');
