-- Replayed tokens. A token is minted for one survey page, and that page's
-- browser fetches its balls within seconds. A valid (signed) token used
-- otherwise was copied out of its page: a probe replayed by a crawler, a
-- proxy, or someone trying to pass one worker's IPv6 address off as
-- another's. Such probes stay in `requests` (they may still be informative)
-- but are flagged here, one row per probe, with the reasons:
--   late           fetched more than 24 hours after the page was served (an
--                  assignment lasts minutes; MTurk allows at most a few hours
--                  of work plus the HIT's lifetime, and a day covers them all);
--   not-served     a ball number the page did not show (0, > its count);
--   repeat         the same ball of the same page fetched again;
--   other-ipv4     a red ball from an IPv4 address other than the page's;
--   other-ipv6     a blue ball from an IPv6 address other than that of the
--                  page's first blue ball.
-- A shared NAT pool or privacy addresses can explain other-ipv4/other-ipv6
-- for a real worker: these are flags for analysis, not verdicts. Forged
-- tokens (bad signature) are in `unverified_requests`, never correlated.

CREATE VIEW replayed_probes AS
WITH probes AS (
    SELECT r.id, r.t, r.site, r.addr, r.kind, r.token, r.ball, r.status,
           s.created, s.ipv4,
           CASE r.kind WHEN 'red' THEN s.red_count ELSE s.blue_count END AS served,
           row_number() OVER (PARTITION BY r.token, r.kind, r.ball ORDER BY r.id) AS nth,
           first_value(r.addr) OVER (PARTITION BY r.token, r.kind ORDER BY r.id) AS first_addr
    FROM requests r
    JOIN sessions s ON s.token = r.token
    WHERE r.token_ok = 1 AND r.kind IN ('red', 'blue') AND r.status = 200
),
flagged AS (
    SELECT *,
           trim(
               CASE WHEN t - created > 86400 THEN 'late ' ELSE '' END
               || CASE WHEN ball IS NULL OR ball < 1 OR ball > served THEN 'not-served ' ELSE '' END
               || CASE WHEN nth > 1 THEN 'repeat ' ELSE '' END
               || CASE WHEN kind = 'red' AND addr <> ipv4 THEN 'other-ipv4 ' ELSE '' END
               || CASE WHEN kind = 'blue' AND addr <> first_addr THEN 'other-ipv6 ' ELSE '' END
           ) AS reasons
    FROM probes
)
SELECT id, strftime('%Y-%m-%dT%H:%M:%fZ', t, 'unixepoch') AS time, site, addr, kind, token,
       ball, reasons
FROM flagged
WHERE reasons <> '';
