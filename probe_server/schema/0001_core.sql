-- Core schema: survey sessions, every HTTP request on the public sites, answers.
-- Times are Unix epoch seconds (REAL, UTC); the views show them as ISO 8601.
-- Addresses are text in canonical form; IPv4-mapped IPv6 is stored as IPv4.

CREATE TABLE sessions (
    id              INTEGER PRIMARY KEY,
    token           TEXT    NOT NULL UNIQUE,
    created         REAL    NOT NULL,
    ipv4            TEXT    NOT NULL,
    port            INTEGER NOT NULL,
    user_agent      TEXT,
    red_count       INTEGER NOT NULL,
    blue_count      INTEGER NOT NULL,
    visit           TEXT    NOT NULL CHECK (visit IN ('preview', 'accepted', 'direct')),
    assignment_id   TEXT,
    hit_id          TEXT,
    worker_id       TEXT,
    turk_submit_to  TEXT,
    batch           TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX sessions_created ON sessions (created);
CREATE INDEX sessions_hit ON sessions (hit_id);

CREATE TABLE requests (
    id          INTEGER PRIMARY KEY,
    t           REAL    NOT NULL,
    site        TEXT    NOT NULL CHECK (site IN ('ipv4', 'ipv6')),
    addr        TEXT    NOT NULL,
    port        INTEGER NOT NULL,
    method      TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    token       TEXT,
    token_ok    INTEGER NOT NULL DEFAULT 0,
    ball        INTEGER,
    status      INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    user_agent  TEXT
);
CREATE INDEX requests_token ON requests (token) WHERE token_ok = 1;
CREATE INDEX requests_t ON requests (t);

CREATE TABLE answers (
    id            INTEGER PRIMARY KEY,
    session_token TEXT    NOT NULL,
    t             REAL    NOT NULL,
    addr          TEXT    NOT NULL,
    red_reported  INTEGER NOT NULL,
    blue_reported INTEGER NOT NULL,
    red_correct   INTEGER NOT NULL
);
CREATE INDEX answers_session ON answers (session_token, id);

-- The first answer per session counts; later ones are kept but not counted.
CREATE VIEW first_answers AS
SELECT a.*
FROM answers a
WHERE a.id = (SELECT min(b.id) FROM answers b WHERE b.session_token = a.session_token);

-- Each session's IPv6 addresses: verified blue-ball fetches on the IPv6 site.
CREATE VIEW session_ipv6 AS
SELECT r.token AS session_token,
       r.addr  AS ipv6,
       count(*) AS fetches,
       min(r.t) AS first_t
FROM requests r
WHERE r.token_ok = 1 AND r.site = 'ipv6' AND r.kind = 'blue' AND r.status = 200
GROUP BY r.token, r.addr;

-- One row per session: the paper's question answered straight from sqlite3.
CREATE VIEW session_summary AS
SELECT s.id,
       s.token,
       strftime('%Y-%m-%dT%H:%M:%fZ', s.created, 'unixepoch') AS created,
       s.ipv4,
       (SELECT group_concat(v.ipv6, ' ') FROM session_ipv6 v WHERE v.session_token = s.token) AS ipv6,
       (SELECT count(*) FROM requests r
         WHERE r.token = s.token AND r.token_ok = 1 AND r.kind = 'red' AND r.status = 200) AS red_fetched,
       (SELECT count(*) FROM requests r
         WHERE r.token = s.token AND r.token_ok = 1 AND r.kind = 'blue' AND r.status = 200) AS blue_fetched,
       s.red_count,
       s.blue_count,
       s.visit,
       s.visit = 'preview' AS preview,
       s.assignment_id,
       s.hit_id,
       s.worker_id,
       s.batch,
       a.red_reported,
       a.blue_reported,
       a.red_correct,
       (SELECT count(*) FROM answers x WHERE x.session_token = s.token) AS submissions
FROM sessions s
LEFT JOIN first_answers a ON a.session_token = s.token;

-- Fetches that carried a token the server did not sign: never correlated.
CREATE VIEW unverified_requests AS
SELECT * FROM requests WHERE token IS NOT NULL AND token_ok = 0;
