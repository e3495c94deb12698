-- Cost (src/cost/, AdminService.GetCostReport): each token's cost per calendar month, in
-- the minor unit (e.g. cents) of the server's `cost.currency`. 0: no cost set.
ALTER TABLE tokens ADD COLUMN monthly_cost_minor BIGINT NOT NULL DEFAULT 0;

-- Leases granted per tenant and token (src/history/): what cost allocation shares a
-- pool token's cost by. usage_history keeps tenants and tokens apart, not the pair.
-- Written like usage_history: each replica upserts only its own rows with their
-- cumulative counts (no contention, nothing counted twice); a read sums replicas. Same
-- buckets and retention; no foreign keys (history outlives deleted objects).
CREATE TABLE usage_grants (
    replica_id TEXT NOT NULL,
    -- Start of the bucket, ms since the Unix epoch (a multiple of history.bucket_ms).
    bucket_start_ms BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    token_id TEXT NOT NULL,
    -- The token's upstream.
    upstream_id TEXT NOT NULL,
    granted BIGINT NOT NULL,
    written_ms BIGINT NOT NULL,
    PRIMARY KEY (replica_id, bucket_start_ms, tenant_id, token_id)
);

-- Reads select a time range; retention deletes by age.
CREATE INDEX usage_grants_by_bucket ON usage_grants (bucket_start_ms);
