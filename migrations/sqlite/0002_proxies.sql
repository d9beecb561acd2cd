-- The fleet as each replica sees it, so any replica can answer GET /v1/proxies for
-- every proxy, whichever replica it streams from. Observations, not configuration:
-- no revision, no change log, no audit.
CREATE TABLE proxies (
    id text PRIMARY KEY,
    status text NOT NULL,
    seen_at bigint NOT NULL
);
