-- The battery's session labels and beacons, made safe to publish
-- (docs/schema.md, docs/battery.md).
--
-- Until now a labelled host name began with the session token, which is
-- also the bearer credential /submit and /beacon accept, and every resolver
-- on the way (and TLS's SNI) saw it. New pages carry a label derived from
-- the token with a keyed hash (tokens.session_label: 24 characters) and
-- store it here; the DNS join uses the label, never the token.

ALTER TABLE battery_pages ADD COLUMN label TEXT;
-- Pages served before this carried their token as the label: the DNS
-- queries already logged for them still join.
UPDATE battery_pages SET label = session_token WHERE labels <> '[]';

-- The first label of a query name, lower-cased (resolvers may randomise
-- letter case, 0x20), for names whose first label has a session label's
-- length: 24 characters (a dot at 25), or 32 for the token labels of pages
-- served before schema 11 (a dot at 33). Partial: other queries cost only
-- the WHERE test. Every join below repeats these two expressions exactly,
-- and compares with +b.label: the unary plus drops the column's TEXT
-- affinity, which would otherwise keep SQLite from searching an index on an
-- expression (schema 7's join scanned the whole index for every session).
DROP INDEX dns_queries_label;
CREATE INDEX dns_queries_label
ON dns_queries (lower(substr(qname, 1, instr(qname, '.') - 1)), family)
WHERE instr(qname, '.') IN (25, 33);

DROP VIEW session_dns;
CREATE VIEW session_dns AS
SELECT b.session_token,
       lower(substr(d.qname, instr(d.qname, '.') + 1)) AS name,
       d.family,
       d.addr AS resolver,
       d.qtype,
       d.rcode,
       count(*) AS queries,
       min(d.t) AS first_t
FROM battery_pages b
JOIN dns_queries d
  ON instr(d.qname, '.') IN (25, 33)
 AND lower(substr(d.qname, 1, instr(d.qname, '.') - 1)) = +b.label
GROUP BY b.session_token, lower(substr(d.qname, instr(d.qname, '.') + 1)), d.family, d.addr,
         d.qtype, d.rcode;

-- As in schema 7, but which beacon counts is now deterministic and cannot be
-- forged by whoever learnt a token: the *first* report sent from the
-- session's own IPv4 address. The script sends one report per page, to the
-- IPv4 site the page came from, so a worker's browser always qualifies
-- (NAT44 keeps one public address per client for both connections, RFC
-- 4787 REQ-2 "paired" pooling); a report from anywhere else, or a later one,
-- is kept in `beacons` but never changes a result.
DROP VIEW battery_probes;
CREATE VIEW battery_probes AS
WITH page_probes AS (
    SELECT b.session_token, s.ipv4, j.value AS probe,
           CASE j.value WHEN 'ipv4' THEN 'red' WHEN 'ipv6' THEN 'blue'
                        WHEN 'mtu' THEN 'mtu-ok' ELSE j.value END AS kind
    FROM battery_pages b
    JOIN sessions s ON s.token = b.session_token
    JOIN json_each(b.probes) j
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
    SELECT min(b.id) FROM beacons b
    WHERE b.session_token = p.session_token AND b.probe = p.probe AND b.addr = p.ipv4);

-- As in schema 7, with the v6ns query found through the session's label.
DROP VIEW battery_outcomes;
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
                    WHERE instr(d.qname, '.') IN (25, 33)
                      AND lower(substr(d.qname, 1, instr(d.qname, '.') - 1)) = +b.label
                      AND d.family = 'ipv6'
                      AND lower(substr(d.qname, instr(d.qname, '.') + 1)) = b.v6ns_host || '.')
               AS v6ns_asked_over_ipv6
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
