-- Results: what `probe-server report` learns about addresses (their class,
-- their GeoIP answers), kept so a report can be reproduced later with the
-- same answers, and the report's numbers as views for sqlite3 and Datasette.
--
-- Which sessions count: every session (survey page served) counts for the
-- address tables, previews and direct visits included, as the paper counted
-- every HTTP request (§4.2, §4.4). Completed HITs count for Table 3 and
-- Figure 2. Country, class and provider come from the two tables below,
-- filled by `probe-server report`; addresses it has not seen yet show as
-- 'unknown' / 'unclassified' until it runs again.

-- Each IPv6 address that fetched a probe, classified (see
-- probe_server/analysis/addresses.py).
CREATE TABLE ipv6_addresses (
    address       TEXT PRIMARY KEY,
    class         TEXT NOT NULL,  -- native, teredo, 6to4, nat64, isatap, ula,
                                  -- link-local, loopback, documentation, special
    embedded_ipv4 TEXT,           -- 6to4 router, NAT64 host, ISATAP node, Teredo client
    teredo_server TEXT,           -- Teredo only: the server's IPv4 address
    teredo_port   INTEGER,        -- Teredo only: the client's NAT-mapped UDP port
    teredo_flags  INTEGER,        -- Teredo only: the 16 flag bits (0x8000: cone NAT)
    geo_address   TEXT            -- what is geolocated for it: itself (native,
                                  -- ISATAP), the embedded IPv4 (tunnels), or NULL
) WITHOUT ROWID;

-- GeoIP answers, one row per address looked up. A NULL *_db means that
-- database was not consulted (not configured then); a NULL answer with a
-- *_db set means the database did not know the address.
CREATE TABLE geoip (
    address      TEXT PRIMARY KEY,
    country      TEXT,     -- ISO 3166-1 alpha-2
    country_name TEXT,     -- English name, as the database gives it
    asn          INTEGER,
    org          TEXT,     -- the AS's organisation
    country_db   TEXT,     -- which database build answered: 'GeoLite2-Country 2024-05-03'
    asn_db       TEXT,
    looked_up    REAL NOT NULL
) WITHOUT ROWID;

-- When MTurk says each assignment was submitted, without reading its row.
CREATE INDEX assignments_submitted ON assignments (assignment_id, submit_time);

-- Answers still missing a database's part (it was not configured then).
CREATE INDEX geoip_incomplete ON geoip (address) WHERE country_db IS NULL OR asn_db IS NULL;

-- How far the enrichment has got: 'sessions' up to id `through` have had
-- their IPv4 address looked up, 'requests' up to id `through` have had their
-- IPv6 address classified.
CREATE TABLE enriched (
    source  TEXT PRIMARY KEY,
    through INTEGER NOT NULL
) WITHOUT ROWID;

-- Indexes for the report views, so they read an index in the order they
-- need instead of sorting a million sessions. Sessions are written once per
-- page view, not per probe, so the server hardly notices them.
CREATE INDEX sessions_ipv4 ON sessions (ipv4, visit);
-- What the reports need of a session, by token: answers and requests join
-- sessions through the token, and walking two indexes in token order is far
-- cheaper than fetching a million rows at random.
CREATE INDEX sessions_facts ON sessions (token, visit, assignment_id, hit_id, batch, ipv4);
CREATE INDEX sessions_assignment ON sessions (assignment_id, token) WHERE visit = 'accepted';
CREATE INDEX sessions_label ON sessions (batch, created) WHERE batch <> '';

-- Blue-ball fetches alone, so session_ipv6 and the reports read a small
-- index instead of the whole request log. Partial: other requests skip it.
CREATE INDEX requests_blue ON requests (token, addr, t)
WHERE token_ok = 1 AND site = 'ipv6' AND kind = 'blue' AND status = 200;

-- Sessions whose blue balls were fetched from a native IPv6 address.
CREATE VIEW native_sessions AS
SELECT DISTINCT r.token AS session_token
FROM requests r INDEXED BY requests_blue
JOIN ipv6_addresses c ON c.address = r.addr AND c.class = 'native'
WHERE r.token_ok = 1 AND r.site = 'ipv6' AND r.kind = 'blue' AND r.status = 200;

-- IPv4 addresses with at least one such session.
CREATE VIEW native_ipv4 AS
SELECT DISTINCT s.ipv4
FROM native_sessions n
JOIN sessions s ON s.token = n.session_token;

-- Sessions by kind of visit.
CREATE VIEW report_sessions AS
SELECT count(*) AS total,
       COALESCE(sum(visit = 'preview'), 0) AS previews,
       COALESCE(sum(visit = 'accepted'), 0) AS accepted,
       COALESCE(sum(visit = 'direct'), 0) AS direct
FROM sessions;

-- One row per unique IPv4 address that loaded the survey: its country and
-- network, its sessions, and whether any of them fetched blue balls over
-- native IPv6.
CREATE VIEW report_ipv4 AS
SELECT i.ipv4,
       COALESCE(g.country, 'unknown') AS country,
       g.country_name,
       g.asn,
       g.org,
       i.sessions,
       i.previews,
       i.accepted,
       i.ipv4 IN (SELECT ipv4 FROM native_ipv4) AS native_ipv6
FROM (
    SELECT ipv4,
           count(*) AS sessions,
           sum(visit = 'preview') AS previews,
           sum(visit = 'accepted') AS accepted
    FROM sessions
    GROUP BY ipv4
) i
LEFT JOIN geoip g ON g.address = i.ipv4;

-- Table 1: unique IPv4 addresses per country.
CREATE VIEW report_countries AS
SELECT country,
       max(country_name) AS country_name,
       count(*) AS ipv4_addresses,
       count(*) * 1.0 / sum(count(*)) OVER () AS share
FROM report_ipv4
GROUP BY country
ORDER BY ipv4_addresses DESC, country;

-- Table 2: IPv6 adoption by the paper's definition, overall (country 'all')
-- and per country, with the Wilson 95% score interval (z = 1.959963984540054)
-- and small_sample = 1 below 30 IPv4 addresses. Needs SQLite's sqrt()
-- (3.35+, built with math functions, as Debian's and Python's are).
CREATE VIEW report_adoption AS
WITH per_country AS MATERIALIZED (
    SELECT country, count(*) AS n, sum(native_ipv6) AS x
    FROM report_ipv4
    GROUP BY country
),
counted AS (
    SELECT 0 AS overall_first, 'all' AS country, sum(n) AS n, sum(x) AS x FROM per_country
    UNION ALL
    SELECT 1, country, n, x FROM per_country
),
terms AS (
    SELECT overall_first, country, n, x,
           x * 1.0 / n AS p,
           1.959963984540054 AS z
    FROM counted
    WHERE n > 0
)
SELECT country,
       n AS ipv4_addresses,
       x AS native_ipv6,
       p AS rate,
       max(0.0, (p + z * z / (2.0 * n)) / (1 + z * z / n)
                - z / (1 + z * z / n) * sqrt(p * (1 - p) / n + z * z / (4.0 * n * n))) AS ci95_low,
       min(1.0, (p + z * z / (2.0 * n)) / (1 + z * z / n)
                + z / (1 + z * z / n) * sqrt(p * (1 - p) / n + z * z / (4.0 * n * n))) AS ci95_high,
       n < 30 AS small_sample
FROM terms
ORDER BY overall_first, n DESC, country;

-- Each unique IPv6 address that fetched blue balls: class, what it embeds,
-- where its geo_address locates, and how many sessions and IPv4 addresses
-- it was paired with.
CREATE VIEW report_ipv6 AS
SELECT v.ipv6,
       COALESCE(c.class, 'unclassified') AS class,
       c.embedded_ipv4,
       c.teredo_server,
       c.teredo_port,
       c.teredo_flags,
       c.geo_address,
       COALESCE(g.country, 'unknown') AS country,
       g.asn,
       g.org,
       v.sessions,
       v.ipv4_addresses
FROM (
    SELECT p.ipv6, count(*) AS sessions, count(DISTINCT s.ipv4) AS ipv4_addresses
    FROM session_ipv6 p
    JOIN sessions s ON s.token = p.session_token
    GROUP BY p.ipv6
) v
LEFT JOIN ipv6_addresses c ON c.address = v.ipv6
LEFT JOIN geoip g ON g.address = c.geo_address;

-- IPv6 addresses by class.
CREATE VIEW report_ipv6_classes AS
SELECT class, count(*) AS addresses
FROM report_ipv6
GROUP BY class
ORDER BY addresses DESC, class;

-- Native IPv6 addresses by provider (origin AS of the address itself).
CREATE VIEW report_providers AS
SELECT asn, COALESCE(max(org), 'unknown') AS org, count(*) AS addresses
FROM report_ipv6
WHERE class = 'native'
GROUP BY asn
ORDER BY addresses DESC, asn;

-- Tunnelled and translated IPv6 addresses by the network of the IPv4
-- address they embed (a Teredo or 6to4 address would otherwise locate the
-- relay, not the client).
CREATE VIEW report_tunnels AS
SELECT class, country, asn, COALESCE(max(org), 'unknown') AS org, count(*) AS addresses
FROM report_ipv6
WHERE class IN ('teredo', '6to4', 'nat64')
GROUP BY class, country, asn
ORDER BY CASE class WHEN 'teredo' THEN 1 WHEN '6to4' THEN 2 ELSE 3 END,
         addresses DESC, country, asn;

-- One row per completed HIT: an accepted assignment (all its sessions: a
-- reload makes a new session) or a direct visit, that answered the survey
-- or that MTurk reports submitted. Its batch and answer come from the
-- session that answered first (else the assignment's first session).
-- Country: the batch's target country when it has exactly one (the Worker
-- Locale MTurk enforced, as in the paper's Table 3), else where the
-- session's IPv4 address geolocates. It completed at MTurk's submit_time
-- when synced, else at the first answer. Hours count from the batch's
-- publication, else from the first session carrying the batch's label or
-- one of its HITs; NULL without a batch.
CREATE VIEW report_completions AS
WITH first_answer AS (
    -- SQLite takes the bare columns t and red_correct from the row holding min(id).
    SELECT session_token, min(id) AS answer_id, t, red_correct
    FROM answers NOT INDEXED  -- one sort beats a random row fetch per answer
    GROUP BY session_token
),
reloaded AS MATERIALIZED (
    -- Assignments with more than one session: the worker reloaded the page.
    SELECT assignment_id
    FROM sessions INDEXED BY sessions_assignment
    WHERE visit = 'accepted'
    GROUP BY assignment_id
    HAVING count(*) > 1
),
answered AS (
    SELECT s.token, s.visit, s.assignment_id, s.hit_id, s.batch, s.ipv4,
           f.t AS answered_at, f.red_correct
    FROM first_answer f
    JOIN sessions s INDEXED BY sessions_facts ON s.token = f.session_token
    WHERE s.visit <> 'preview'
      AND (s.visit = 'direct' OR s.assignment_id NOT IN reloaded OR NOT EXISTS (
               SELECT 1
               FROM sessions o INDEXED BY sessions_assignment
               JOIN answers b ON b.session_token = o.token
               WHERE o.assignment_id = s.assignment_id AND o.visit = 'accepted'
                 AND b.id < f.answer_id))
),
submitted AS (
    -- Assignments MTurk reports submitted whose answer never reached us.
    SELECT s.token, s.visit, s.assignment_id, s.hit_id, s.batch, s.ipv4,
           NULL AS answered_at, NULL AS red_correct
    FROM assignments g INDEXED BY assignments_submitted
    JOIN sessions s ON s.id = (
        SELECT min(o.id) FROM sessions o INDEXED BY sessions_assignment
        WHERE o.assignment_id = g.assignment_id AND o.visit = 'accepted')
    WHERE g.submit_time IS NOT NULL
      AND NOT EXISTS (
          SELECT 1
          FROM sessions o INDEXED BY sessions_assignment
          JOIN answers b ON b.session_token = o.token
          WHERE o.assignment_id = g.assignment_id AND o.visit = 'accepted')
),
batch_start AS (
    SELECT batch, min(first_created) AS first_created
    FROM (
        SELECT batch, min(created) AS first_created
        FROM sessions
        WHERE batch <> ''
        GROUP BY batch
        UNION ALL
        SELECT h.batch, min(s.created)
        FROM batches b
        JOIN hits h ON h.batch = b.name
        JOIN sessions s ON s.hit_id = h.hit_id
        WHERE b.published IS NULL
        GROUP BY h.batch
    )
    GROUP BY batch
),
-- Everything a completion needs from its batch, by batch name: a few rows,
-- so a million lookups in it stay cheap.
batch_info AS MATERIALIZED (
    SELECT name AS batch, reward, countries, published FROM batches
    UNION ALL
    SELECT batch, NULL, '', NULL FROM batch_start
    WHERE batch NOT IN (SELECT name FROM batches)
),
batch_info_start AS MATERIALIZED (
    SELECT i.batch, i.reward, i.countries, COALESCE(i.published, s.first_created) AS start
    FROM batch_info i
    LEFT JOIN batch_start s ON s.batch = i.batch
),
hit_batch AS MATERIALIZED (
    SELECT hit_id, batch FROM hits
),
completed AS (
    SELECT * FROM answered
    UNION ALL
    SELECT * FROM submitted
)
SELECT c.token AS session_token,
       CASE WHEN c.visit = 'accepted' THEN c.assignment_id END AS assignment_id,
       -- the session_batch rule: the HIT's batch, else the label
       COALESCE(h.batch, NULLIF(c.batch, '')) AS batch,
       b.reward,
       CASE WHEN length(b.countries) = 2 THEN b.countries
            ELSE COALESCE((SELECT g.country FROM geoip g WHERE g.address = c.ipv4), 'unknown')
       END AS country,
       COALESCE(asg.submit_time, c.answered_at) AS completed_at,
       (COALESCE(asg.submit_time, c.answered_at) - b.start) / 3600.0 AS hours,
       COALESCE(c.red_correct, 0) AS correct
FROM completed c
LEFT JOIN hit_batch h ON h.hit_id = c.hit_id
LEFT JOIN batch_info_start b ON b.batch = COALESCE(h.batch, NULLIF(c.batch, ''))
LEFT JOIN assignments asg INDEXED BY assignments_submitted
       ON asg.assignment_id = CASE WHEN c.visit = 'accepted' THEN c.assignment_id END;

-- Table 3: completed and correct (red count right) HITs per batch and
-- country.
CREATE VIEW report_batches AS
SELECT batch,
       max(reward) AS reward,
       country,
       count(*) AS completed,
       sum(correct) AS correct
FROM report_completions
GROUP BY batch, country
ORDER BY country, CAST(max(reward) AS REAL), batch;

-- §4.4: sessions and requests from previews, accepted assignments and
-- direct visits; 'none' counts requests tied to no session (no token, or
-- one the server did not sign). Every signed token has its session (both
-- are written in one transaction), so accepted requests are what remains of
-- the signed ones, which spares a lookup per accepted session.
CREATE VIEW report_previews AS
WITH visits AS (
    SELECT count(*) AS sessions,
           COALESCE(sum(visit = 'preview'), 0) AS previews,
           COALESCE(sum(visit = 'direct'), 0) AS direct
    FROM sessions INDEXED BY sessions_facts
),
counted AS (
    SELECT s.visit,
           sum((SELECT count(*) FROM requests r WHERE r.token = s.token AND r.token_ok = 1))
               AS requests
    FROM sessions s INDEXED BY sessions_facts
    WHERE s.visit IN ('preview', 'direct')
    GROUP BY s.visit
),
signed AS (
    SELECT count(*) AS requests FROM requests WHERE token_ok = 1
)
SELECT 'preview' AS visit,
       v.previews AS sessions,
       COALESCE((SELECT requests FROM counted WHERE visit = 'preview'), 0) AS requests
FROM visits v
UNION ALL
SELECT 'accepted',
       v.sessions - v.previews - v.direct,
       (SELECT requests FROM signed) - COALESCE((SELECT sum(requests) FROM counted), 0)
FROM visits v
UNION ALL
SELECT 'direct', v.direct, COALESCE((SELECT requests FROM counted WHERE visit = 'direct'), 0)
FROM visits v
UNION ALL
SELECT 'none', 0, (SELECT count(*) FROM requests) - (SELECT requests FROM signed);
