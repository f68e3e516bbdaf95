-- The measurement battery (probe_server/battery.py): test-ipv6.com's and
-- APNIC Labs' probes on the ball page, the beacon's reports, each session
-- joined with the DNS queries for its names, and each session's outcome in
-- the manner of test-ipv6.com. Described in docs/schema.md.

-- One row per page that carried the battery (the paper's page has none).
CREATE TABLE battery_pages (
    session_token TEXT    PRIMARY KEY,
    probes        TEXT    NOT NULL,  -- JSON array: ["ipv4","ipv6","ds","literal","mtu","v6ns"]
    labels        TEXT    NOT NULL,  -- JSON array of base URLs whose host carried the label
    beacon        INTEGER NOT NULL,  -- 1 when the page carried the beacon script
    v6ns_host     TEXT               -- the v6ns probe's host below the label: ds.v6ns.example.org
) WITHOUT ROWID;

-- What the beacon script reported: one row per probe per report.
CREATE TABLE beacons (
    id            INTEGER PRIMARY KEY,
    session_token TEXT    NOT NULL,
    t             REAL    NOT NULL,
    addr          TEXT    NOT NULL,
    final         INTEGER NOT NULL,  -- 1: all settled or timed out; 0: the page was closed first
    probe         TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('loaded', 'failed', 'timeout', 'pending')),
    at_ms         REAL,              -- when it settled, ms since the page's navigation began
    duration_ms   REAL,              -- Resource Timing: fetch start to response end
    dns_ms        REAL,
    connect_ms    REAL
);
CREATE INDEX beacons_session ON beacons (session_token, probe, id);

-- Each IPv4 address paired with each IPv6 address of its session, and the
-- 6rd hint (test-ipv6.com's heuristic): how many trailing bits of the IPv4
-- address appear in bits 32-63 of the IPv6 address, 0 when fewer than 16.
-- Filled by `probe-server report`, like ipv6_addresses.
CREATE TABLE address_pairs (
    ipv4       TEXT    NOT NULL,
    ipv6       TEXT    NOT NULL,
    sixrd_bits INTEGER NOT NULL,
    PRIMARY KEY (ipv4, ipv6)
) WITHOUT ROWID;

-- Per-session names are <token>.<probe name>: the first 32 characters of the
-- query name, lower-cased (resolvers may randomise letter case, 0x20). A
-- partial index: queries for other names cost only the WHERE test.
CREATE INDEX dns_queries_label ON dns_queries (lower(substr(qname, 1, 32)), family)
WHERE substr(qname, 33, 1) = '.';

-- Which resolvers asked for each session's names, over which family.
CREATE VIEW session_dns AS
SELECT b.session_token,
       lower(substr(d.qname, 34)) AS name,
       d.family,
       d.addr AS resolver,
       d.qtype,
       d.rcode,
       count(*) AS queries,
       min(d.t) AS first_t
FROM battery_pages b
JOIN dns_queries d
  ON lower(substr(d.qname, 1, 32)) = b.session_token AND substr(d.qname, 33, 1) = '.'
GROUP BY b.session_token, lower(substr(d.qname, 34)), d.family, d.addr, d.qtype, d.rcode;

-- One row per probe of each battery page: its result and, when fetched, the
-- family and address that fetched it. The server's log decides success (a
-- beacon cannot claim one); the last beacon tells why the rest failed:
--   ok       fetched (the large probe: its follow-up fetched)
--   failed   the page saw an error
--   timeout  still loading after battery.beacon_timeout
--   pending  still loading when the page was closed, before that
--   missing  never fetched, and no beacon to say why (no JavaScript, or
--            the page was closed before its report)
CREATE VIEW battery_probes AS
WITH page_probes AS (
    SELECT b.session_token, j.value AS probe,
           CASE j.value WHEN 'ipv4' THEN 'red' WHEN 'ipv6' THEN 'blue'
                        WHEN 'mtu' THEN 'mtu-ok' ELSE j.value END AS kind
    FROM battery_pages b, json_each(b.probes) j
)
SELECT p.session_token,
       p.probe,
       CASE WHEN f.id IS NOT NULL THEN 'ok'
            WHEN k.state IN ('failed', 'timeout', 'pending') THEN k.state
            ELSE 'missing' END AS result,
       f.site,
       f.addr,
       f.t,
       CASE WHEN p.probe = 'mtu' THEN EXISTS (
                SELECT 1 FROM requests r
                WHERE r.token = p.session_token AND r.token_ok = 1 AND r.kind = 'mtu')
            ELSE f.id IS NOT NULL END AS requested,
       k.state AS beacon_state,
       k.at_ms,
       k.duration_ms,
       k.dns_ms,
       k.connect_ms
FROM page_probes p
LEFT JOIN requests f ON f.id = (
    SELECT r.id FROM requests r
    WHERE r.token = p.session_token AND r.token_ok = 1 AND r.kind = p.kind AND r.status = 200
    ORDER BY r.id LIMIT 1)
LEFT JOIN beacons k ON k.id = (
    SELECT max(b.id) FROM beacons b
    WHERE b.session_token = p.session_token AND b.probe = p.probe);

-- One row per battery page: each outcome 1 (yes), 0 (no) or NULL (not
-- measured: the probe was not on the page, or was still loading when the
-- page was closed), in the manner of test-ipv6.com:
--   ipv4_only          IPv4 works, nothing over IPv6 does, the dual-stack
--                      name (if on the page) came over IPv4
--   ipv6_capable       a blue ball arrived over IPv6 (any kind of address)
--   ipv6_preferred     the dual-stack name was fetched over IPv6 (NULL
--                      when it was not fetched at all)
--   broken_dual_stack  the red balls arrived, the dual-stack name never did
--   ipv6_without_aaaa  the IPv6 literal arrived, the IPv6-only name did not
--                      (not for a Teredo address, once classified)
--   mtu_trouble        IPv6 works but the large response never got through
--   resolver_ipv6      the worker's resolver reached our DNS over IPv6: it
--                      asked for the session's v6ns name over IPv6 (with
--                      labels), or the v6ns probe arrived
-- and tunnel hints for the session's first IPv6 address (NULL without one
-- or before `probe-server report` classified it): Teredo and 6to4 by
-- prefix; for native addresses, 6rd (≥ 16 bits of the IPv4 address in bits
-- 32-63) and IPv4 and IPv6 in different ASNs.
CREATE VIEW battery_outcomes AS
WITH results AS (
    SELECT session_token,
           max(CASE WHEN probe = 'ipv4' THEN result END) AS ipv4,
           max(CASE WHEN probe = 'ipv6' THEN result END) AS ipv6,
           max(CASE WHEN probe = 'ds' THEN result END) AS ds,
           max(CASE WHEN probe = 'ds' THEN site END) AS ds_site,
           max(CASE WHEN probe = 'literal' THEN result END) AS literal,
           max(CASE WHEN probe = 'mtu' THEN result END) AS mtu,
           max(CASE WHEN probe = 'v6ns' THEN result END) AS v6ns
    FROM battery_probes
    GROUP BY session_token
),
facts AS (
    SELECT r.*,
           s.ipv4 AS ipv4_address,
           (SELECT q.addr FROM requests q
             WHERE q.token = r.session_token AND q.token_ok = 1 AND q.site = 'ipv6'
               AND q.status = 200 ORDER BY q.id LIMIT 1) AS ipv6_address,
           b.v6ns_host,
           EXISTS (SELECT 1 FROM json_each(b.labels) WHERE value = 'v6ns') AS v6ns_labelled,
           EXISTS (SELECT 1 FROM dns_queries d
                    WHERE lower(substr(d.qname, 1, 32)) = r.session_token
                      AND substr(d.qname, 33, 1) = '.' AND d.family = 'ipv6'
                      AND lower(substr(d.qname, 34)) = b.v6ns_host || '.') AS v6ns_asked_over_ipv6
    FROM results r
    JOIN battery_pages b ON b.session_token = r.session_token
    JOIN sessions s ON s.token = r.session_token
)
SELECT f.session_token,
       f.ipv4_address AS ipv4,
       f.ipv6_address AS ipv6,
       COALESCE(g4.country, 'unknown') AS country,
       f.ipv4 AS ipv4_result,
       f.ipv6 AS ipv6_result,
       f.ds AS ds_result,
       f.ds_site,
       f.literal AS literal_result,
       f.mtu AS mtu_result,
       f.v6ns AS v6ns_result,
       f.v6ns_asked_over_ipv6,
       CASE WHEN f.ipv4 <> 'ok' THEN NULL
            WHEN f.ipv6_address IS NOT NULL THEN 0
            WHEN 'pending' IN (f.ipv6, COALESCE(f.literal, ''), COALESCE(f.ds, '')) THEN NULL
            WHEN f.ds IS NULL OR f.ds = 'ok' THEN 1
            ELSE 0 END AS ipv4_only,
       CASE WHEN f.ipv6 = 'ok' THEN 1 WHEN f.ipv6 = 'pending' THEN NULL ELSE 0 END
           AS ipv6_capable,
       CASE WHEN f.ds = 'ok' THEN f.ds_site = 'ipv6' END AS ipv6_preferred,
       CASE WHEN f.ds IS NULL OR f.ipv4 <> 'ok' OR f.ds = 'pending' THEN NULL
            WHEN f.ds = 'ok' THEN 0 ELSE 1 END AS broken_dual_stack,
       CASE WHEN f.literal IS NULL OR 'pending' IN (f.literal, f.ipv6) THEN NULL
            -- A browser whose only IPv6 is Teredo does not ask for AAAA at
            -- all (Chromium, seen in the lab): not a resolver's doing.
            -- test-ipv6.com leaves Teredo out of this outcome too.
            WHEN c.class = 'teredo' THEN 0
            WHEN f.literal = 'ok' AND f.ipv6 <> 'ok' THEN 1 ELSE 0 END AS ipv6_without_aaaa,
       CASE WHEN f.mtu IS NULL OR f.ipv6 <> 'ok' OR f.mtu = 'pending' THEN NULL
            WHEN f.mtu = 'ok' THEN 0 ELSE 1 END AS mtu_trouble,
       CASE WHEN f.v6ns IS NULL THEN NULL
            WHEN f.v6ns_asked_over_ipv6 OR f.v6ns = 'ok' THEN 1
            WHEN f.v6ns = 'pending' THEN NULL
            -- Without the DNS log, a failed fetch says something of the
            -- resolver only where a dual-stack name loads (test-ipv6.com's rule).
            WHEN f.v6ns_labelled OR f.ds = 'ok' THEN 0
            END AS resolver_ipv6,
       CASE WHEN c.class IS NOT NULL THEN c.class = 'teredo' END AS hint_teredo,
       CASE WHEN c.class IS NOT NULL THEN c.class = '6to4' END AS hint_6to4,
       CASE WHEN c.class = 'native' THEN COALESCE(pr.sixrd_bits >= 16, 0)
            WHEN c.class IS NOT NULL THEN 0 END AS hint_6rd,
       CASE WHEN c.class = 'native' AND g4.asn IS NOT NULL AND g6.asn IS NOT NULL
            THEN g4.asn <> g6.asn
            WHEN c.class IS NOT NULL THEN 0 END AS hint_asn_differs
FROM facts f
LEFT JOIN geoip g4 ON g4.address = f.ipv4_address
LEFT JOIN ipv6_addresses c ON c.address = f.ipv6_address
LEFT JOIN geoip g6 ON g6.address = c.geo_address
LEFT JOIN address_pairs pr ON pr.ipv4 = f.ipv4_address AND pr.ipv6 = f.ipv6_address;

-- The report's battery table: each outcome and hint overall (country 'all')
-- and per country, over the sessions where it was measured, with the
-- Wilson 95% score interval as in report_adoption; small_sample = 1 below
-- 30 sessions.
CREATE VIEW report_battery AS
WITH o AS MATERIALIZED (SELECT * FROM battery_outcomes),
long AS (
    SELECT country, 'ipv4_only' AS outcome, ipv4_only AS value FROM o
    UNION ALL SELECT country, 'ipv6_capable', ipv6_capable FROM o
    UNION ALL SELECT country, 'ipv6_preferred', ipv6_preferred FROM o
    UNION ALL SELECT country, 'broken_dual_stack', broken_dual_stack FROM o
    UNION ALL SELECT country, 'ipv6_without_aaaa', ipv6_without_aaaa FROM o
    UNION ALL SELECT country, 'mtu_trouble', mtu_trouble FROM o
    UNION ALL SELECT country, 'resolver_ipv6', resolver_ipv6 FROM o
    UNION ALL SELECT country, 'hint_teredo', hint_teredo FROM o
    UNION ALL SELECT country, 'hint_6to4', hint_6to4 FROM o
    UNION ALL SELECT country, 'hint_6rd', hint_6rd FROM o
    UNION ALL SELECT country, 'hint_asn_differs', hint_asn_differs FROM o
),
counted AS (
    SELECT 0 AS overall_first, 'all' AS country, outcome, count(value) AS n, sum(value) AS x
    FROM long GROUP BY outcome
    UNION ALL
    SELECT 1, country, outcome, count(value), sum(value) FROM long GROUP BY country, outcome
),
terms AS (
    SELECT overall_first, country, outcome, n, x, x * 1.0 / n AS p, 1.959963984540054 AS z
    FROM counted
    WHERE n > 0
)
SELECT country,
       outcome,
       n AS sessions,
       x AS yes,
       p AS rate,
       max(0.0, (p + z * z / (2.0 * n)) / (1 + z * z / n)
                - z / (1 + z * z / n) * sqrt(p * (1 - p) / n + z * z / (4.0 * n * n))) AS ci95_low,
       min(1.0, (p + z * z / (2.0 * n)) / (1 + z * z / n)
                + z / (1 + z * z / n) * sqrt(p * (1 - p) / n + z * z / (4.0 * n * n))) AS ci95_high,
       n < 30 AS small_sample
FROM terms
ORDER BY overall_first, country, outcome;
