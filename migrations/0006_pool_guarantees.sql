-- Running totals for the 80 % rule (src/store/sql/guarantees.rs): per pool, the sum of
-- its tenants' guarantees (tier guarantee or override, before dedicated tokens cover any
-- of it). Every admin write that moves a total moves it in its own transaction, so the
-- check reads one row instead of summing every tenant of the pool. A pool without a row
-- has no tenant guarantees. Rows go with their pool.
CREATE TABLE pool_guarantees (
    pool_id TEXT PRIMARY KEY REFERENCES pools (id) ON DELETE CASCADE,
    guaranteed BIGINT NOT NULL
);

INSERT INTO pool_guarantees (pool_id, guaranteed)
SELECT t.pool_id, SUM(COALESCE(t.guaranteed_override, r.guaranteed_per_window))
FROM tenants t JOIN tiers r ON r.id = t.tier_id
WHERE t.pool_id IS NOT NULL
GROUP BY t.pool_id;

-- The version of the last write that kept the totals. A replica that predates them
-- bumps `version` alone; the next write that finds `guarantees_version` behind the
-- version before its own recounts every pool first, so such a write can cost time but
-- never make a total wrong.
ALTER TABLE config_meta ADD COLUMN guarantees_version BIGINT NOT NULL DEFAULT 0;

UPDATE config_meta SET guarantees_version = version;
