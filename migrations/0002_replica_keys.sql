-- The master keys each running replica holds, so that `tokenlease rotate-keys` can
-- refuse to seal tokens with a key some live replica could not open. Each replica
-- rewrites its row periodically and after reloading its keys; rows of replicas gone
-- for good are ignored once stale (and pruned by the next announcement).
CREATE TABLE replica_keys (
    replica_id TEXT PRIMARY KEY,
    -- Key ids, comma-separated, sorted.
    key_ids TEXT NOT NULL,
    seen_ms BIGINT NOT NULL
);
