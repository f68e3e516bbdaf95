-- What each DNS reply said, beyond its RCODE (docs/schema.md): how many
-- records were in its answer and authority sections (RFC 1035 §4.1.1
-- ANCOUNT, NSCOUNT). NOERROR alone does not tell an answer from NODATA (the
-- name exists, the type does not: no answer, the SOA in authority) or from
-- a referral (no answer, NS records in authority). NULL when nothing was
-- sent, and for rows logged before schema 12.

ALTER TABLE dns_queries ADD COLUMN ancount INTEGER;
ALTER TABLE dns_queries ADD COLUMN nscount INTEGER;

-- As in schema 11, with the counts: a session's NODATA answers are the rows
-- with rcode NOERROR and ancount 0.
DROP VIEW session_dns;
CREATE VIEW session_dns AS
SELECT b.session_token,
       lower(substr(d.qname, instr(d.qname, '.') + 1)) AS name,
       d.family,
       d.addr AS resolver,
       d.qtype,
       d.rcode,
       d.ancount,
       d.nscount,
       count(*) AS queries,
       min(d.t) AS first_t
FROM battery_pages b
JOIN dns_queries d
  ON instr(d.qname, '.') IN (25, 33)
 AND lower(substr(d.qname, 1, instr(d.qname, '.') - 1)) = +b.label
GROUP BY b.session_token, lower(substr(d.qname, instr(d.qname, '.') + 1)), d.family, d.addr,
         d.qtype, d.rcode, d.ancount, d.nscount;
