-- Cost (src/cost/, AdminService.GetCostReport): each token's cost per calendar month, in
-- the minor unit (e.g. cents) of the server's `cost.currency`. 0: no cost set.
ALTER TABLE tokens ADD COLUMN monthly_cost_minor BIGINT NOT NULL DEFAULT 0;

-- Leases granted per tenant on each pool's tokens (src/history/): what cost allocation
-- shares a pool's cost by. usage_history counts a tenant's grants without saying which
-- pool they came from (dedicated tokens' included). One row per tenant and pool per
-- bucket: it grows with tenants, not with tenants x tokens.
-- Written like usage_history: each replica upserts only its own rows with their
-- cumulative counts (no contention, nothing counted twice); a read sums replicas. Same
-- buckets and retention; no foreign keys (history outlives deleted objects).
CREATE TABLE usage_grants (
    replica_id TEXT NOT NULL,
    -- Start of the bucket, ms since the Unix epoch (a multiple of history.bucket_ms).
    bucket_start_ms BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    pool_id TEXT NOT NULL,
    -- The pool's upstream.
    upstream_id TEXT NOT NULL,
    granted BIGINT NOT NULL,
    written_ms BIGINT NOT NULL,
    PRIMARY KEY (replica_id, bucket_start_ms, tenant_id, pool_id)
);

-- Reads select a time range; retention deletes by age.
CREATE INDEX usage_grants_by_bucket ON usage_grants (bucket_start_ms);
