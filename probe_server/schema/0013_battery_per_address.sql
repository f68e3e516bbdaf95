-- The battery's report counts IPv4 addresses, as the paper's tables do
-- (docs/schema.md, docs/battery.md). Schema 7 counted sessions, so a worker
-- who reloaded the page, or took several HITs, counted once per page, and
-- the battery's rates could not be read beside Table 2's.
--
-- Per IPv4 address and outcome: 1 when any of its sessions measured yes,
-- 0 when every session that measured it said no, not counted when none
-- measured it. The same rule as report_adoption's: an address has native
-- IPv6 when any of its sessions fetched a blue ball over native IPv6.
-- battery_outcomes keeps one row per session, for analyses by sample.

DROP VIEW report_battery;
CREATE VIEW report_battery AS
WITH o AS MATERIALIZED (SELECT * FROM battery_outcomes),
long AS (
    SELECT ipv4, country, 'ipv4_only' AS outcome, ipv4_only AS value FROM o
    UNION ALL SELECT ipv4, country, 'ipv6_capable', ipv6_capable FROM o
    UNION ALL SELECT ipv4, country, 'ipv6_preferred', ipv6_preferred FROM o
    UNION ALL SELECT ipv4, country, 'broken_dual_stack', broken_dual_stack FROM o
    UNION ALL SELECT ipv4, country, 'ipv6_without_aaaa', ipv6_without_aaaa FROM o
    UNION ALL SELECT ipv4, country, 'mtu_trouble', mtu_trouble FROM o
    UNION ALL SELECT ipv4, country, 'resolver_ipv6', resolver_ipv6 FROM o
    UNION ALL SELECT ipv4, country, 'hint_teredo', hint_teredo FROM o
    UNION ALL SELECT ipv4, country, 'hint_6to4', hint_6to4 FROM o
    UNION ALL SELECT ipv4, country, 'hint_6rd', hint_6rd FROM o
    UNION ALL SELECT ipv4, country, 'hint_asn_differs', hint_asn_differs FROM o
),
-- The country is that of the address, the same for each of its sessions.
per_address AS (
    SELECT ipv4, max(country) AS country, outcome, max(value) AS value
    FROM long
    GROUP BY ipv4, outcome
),
counted AS (
    SELECT 0 AS overall_first, 'all' AS country, outcome, count(value) AS n, sum(value) AS x
    FROM per_address GROUP BY outcome
    UNION ALL
    SELECT 1, country, outcome, count(value), sum(value) FROM per_address GROUP BY country, outcome
),
terms AS (
    SELECT overall_first, country, outcome, n, x, x * 1.0 / n AS p, 1.959963984540054 AS z
    FROM counted
    WHERE n > 0
)
SELECT country,
       outcome,
       n AS ipv4_addresses,
       x AS yes,
       p AS rate,
       max(0.0, (p + z * z / (2.0 * n)) / (1 + z * z / n)
                - z / (1 + z * z / n) * sqrt(p * (1 - p) / n + z * z / (4.0 * n * n))) AS ci95_low,
       min(1.0, (p + z * z / (2.0 * n)) / (1 + z * z / n)
                + z / (1 + z * z / n) * sqrt(p * (1 - p) / n + z * z / (4.0 * n * n))) AS ci95_high,
       n < 30 AS small_sample
FROM terms
ORDER BY overall_first, country, outcome;
