-- unverified_requests, redefined: every probe fetch whose token was not
-- verified. Schema 1 selected only rows with a token, but a token without a
-- token's shape (mistyped, cut short, "garbage") is stored as NULL, so those
-- fetches were missing. A probe kind with token_ok = 0 is now included
-- whatever its token; other requests still count when they carried a
-- token-shaped token that the server did not sign (a forged answer).

DROP VIEW unverified_requests;

CREATE VIEW unverified_requests AS
SELECT * FROM requests
WHERE token_ok = 0
  AND (token IS NOT NULL
       OR kind IN ('red', 'blue', 'ds', 'literal', 'mtu', 'mtu-ok', 'v6ns'));
