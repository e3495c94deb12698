-- The longest block one rate-limit report may put on a token of this upstream, ms; 0
-- means the default, 4 × block_duration (see `quarantine_max`).
ALTER TABLE upstreams ADD COLUMN max_block_ms BIGINT NOT NULL DEFAULT 0 CHECK (max_block_ms >= 0);
