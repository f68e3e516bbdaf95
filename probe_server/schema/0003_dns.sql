-- DNS: every message received by the authoritative DNS server.
-- One row per query (or malformed packet), written by the same group-commit
-- writer as the HTTP requests, but the reply does not wait for the commit.

CREATE TABLE dns_queries (
    id           INTEGER PRIMARY KEY,
    t            REAL    NOT NULL,
    family       TEXT    NOT NULL CHECK (family IN ('ipv4', 'ipv6')),
    addr         TEXT    NOT NULL,    -- the resolver (or client) address
    port         INTEGER NOT NULL,
    transport    TEXT    NOT NULL CHECK (transport IN ('udp', 'tcp')),
    qname        TEXT,                -- as sent, letter case kept; NULL if unreadable
    qtype        TEXT,                -- mnemonic: A, AAAA, TYPE65534
    rcode        TEXT,                -- NOERROR, NXDOMAIN, ...; NULL when nothing was sent
    size         INTEGER NOT NULL,    -- reply bytes (0 when nothing was sent)
    truncated    INTEGER NOT NULL,    -- 1 when TC=1 was sent
    rrl          TEXT    NOT NULL CHECK (rrl IN ('pass', 'drop', 'slip')),
    edns_version INTEGER,             -- the query's EDNS version; NULL without EDNS
    udp_size     INTEGER              -- the query's EDNS UDP payload size
);
CREATE INDEX dns_queries_t ON dns_queries (t);

-- One row per resolver address: which resolvers reach us, over which family.
CREATE VIEW dns_resolvers AS
SELECT family,
       addr,
       count(*) AS queries,
       sum(transport = 'tcp') AS tcp_queries,
       sum(rrl <> 'pass') AS rate_limited,
       strftime('%Y-%m-%dT%H:%M:%fZ', min(t), 'unixepoch') AS first_seen,
       strftime('%Y-%m-%dT%H:%M:%fZ', max(t), 'unixepoch') AS last_seen
FROM dns_queries
GROUP BY family, addr;
