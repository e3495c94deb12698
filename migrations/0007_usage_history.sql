-- Usage history (src/history/): per time bucket, per subject (a tenant, or a token of an
-- upstream), what each replica counted. Each replica upserts only its own rows with
-- their cumulative values, so replicas never write the same row and a repeated write
-- counts nothing twice; a read sums the replicas. No foreign keys: the history of a
-- deleted tenant or token stays until retention removes it.
CREATE TABLE usage_history (
    replica_id TEXT NOT NULL,
    -- Start of the bucket, ms since the Unix epoch (a multiple of history.bucket_ms).
    bucket_start_ms BIGINT NOT NULL,
    -- 'tenant' or 'token'.
    subject_kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    -- The token's upstream; empty for a tenant.
    upstream_id TEXT NOT NULL,
    asked BIGINT NOT NULL,
    granted BIGINT NOT NULL,
    denied_tenant_quota BIGINT NOT NULL,
    denied_no_token_capacity BIGINT NOT NULL,
    denied_no_usable_token BIGINT NOT NULL,
    denied_wait_timeout BIGINT NOT NULL,
    denied_counters_recovering BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    borrowed BIGINT NOT NULL,
    succeeded BIGINT NOT NULL,
    upstream_errors BIGINT NOT NULL,
    rate_limited BIGINT NOT NULL,
    not_used BIGINT NOT NULL,
    -- Wait histogram: comma-separated counts per bucket of history::WAIT_BOUNDS_MS.
    waits TEXT NOT NULL,
    written_ms BIGINT NOT NULL,
    PRIMARY KEY (replica_id, bucket_start_ms, subject_kind, subject_id, upstream_id)
);

-- Reads select a time range; retention deletes by age.
CREATE INDEX usage_history_by_bucket ON usage_history (bucket_start_ms, subject_kind, subject_id);
