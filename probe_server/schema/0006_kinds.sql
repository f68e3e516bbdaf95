-- The paper's other two experiments and the survey's languages: speed-test
-- reports (§3.1, §4.1), run-a-tool reports (§3.2) and native-language HITs
-- (§5.1). Every kind of survey page makes a session as the ball page does
-- (its hidden red and blue probe images are the session's red_count and
-- blue_count), so the address views correlate IPv4 and IPv6 for all kinds.

-- Which page the session showed: 'balls' (§3.3), 'speedtest' or 'tool'.
ALTER TABLE sessions ADD COLUMN survey TEXT NOT NULL DEFAULT 'balls';
-- The page's language (en, ja, tr, hi: the shipped catalogues).
ALTER TABLE sessions ADD COLUMN language TEXT NOT NULL DEFAULT 'en';

-- What a batch was published as (the experiment file's kind and the batch's
-- language); batches published before these columns were balls in English.
ALTER TABLE batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'balls';
ALTER TABLE batches ADD COLUMN language TEXT NOT NULL DEFAULT 'en';

-- One row per speed test per submission of the speedtest page. The server
-- stores a submission only when every test's speeds (and share link, when
-- given) are valid, all its rows in one transaction with the same t.
CREATE TABLE speedtest_reports (
    id            INTEGER PRIMARY KEY,
    session_token TEXT    NOT NULL,
    t             REAL    NOT NULL,
    addr          TEXT    NOT NULL,   -- the address that submitted the form
    test          TEXT    NOT NULL,   -- the configured test's id, e.g. 'ookla'
    name          TEXT    NOT NULL,   -- its name as the worker saw it
    download_mbps REAL    NOT NULL CHECK (download_mbps > 0),
    upload_mbps   REAL    NOT NULL CHECK (upload_mbps > 0),
    share_url     TEXT                -- https link on the test's own site, if given
);
CREATE INDEX speedtest_reports_session ON speedtest_reports (session_token, t);

-- One row per submission of the tool page: the report id or URL the tool
-- gave the worker, which matched the configured pattern.
CREATE TABLE tool_reports (
    id            INTEGER PRIMARY KEY,
    session_token TEXT    NOT NULL,
    t             REAL    NOT NULL,
    addr          TEXT    NOT NULL,
    tool          TEXT    NOT NULL,   -- the tool's name as the worker saw it
    report        TEXT    NOT NULL
);
CREATE INDEX tool_reports_session ON tool_reports (session_token, id);

-- The first submission of each session counts (as for answers). A vantage
-- point is a worker (NULL for a direct visit) at an IPv4 address; ipv6 is
-- what the session's hidden blue probe was fetched from, if anything.
CREATE VIEW speedtest_results AS
SELECT s.token AS session_token,
       s.worker_id,
       s.ipv4,
       (SELECT group_concat(v.ipv6, ' ') FROM session_ipv6 v WHERE v.session_token = s.token) AS ipv6,
       COALESCE(h.batch, NULLIF(s.batch, '')) AS batch,
       s.language,
       r.test,
       r.name,
       r.download_mbps,
       r.upload_mbps,
       r.share_url,
       r.t
FROM speedtest_reports r
JOIN sessions s ON s.token = r.session_token
LEFT JOIN hits h ON h.hit_id = s.hit_id
WHERE r.t = (SELECT min(x.t) FROM speedtest_reports x WHERE x.session_token = r.session_token);

CREATE VIEW tool_results AS
SELECT s.token AS session_token,
       s.worker_id,
       s.ipv4,
       (SELECT group_concat(v.ipv6, ' ') FROM session_ipv6 v WHERE v.session_token = s.token) AS ipv6,
       COALESCE(h.batch, NULLIF(s.batch, '')) AS batch,
       s.language,
       r.tool,
       r.report,
       r.t
FROM tool_reports r
JOIN sessions s ON s.token = r.session_token
LEFT JOIN hits h ON h.hit_id = s.hit_id
WHERE r.id = (SELECT min(x.id) FROM tool_reports x WHERE x.session_token = r.session_token);
