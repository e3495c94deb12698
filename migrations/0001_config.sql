-- The configuration store: upstream profiles, pools, tiers, tenants, tokens, API keys.
--
-- One file for Postgres and SQLite, run through sqlx's `Any` driver, so only portable
-- SQL appears here:
-- * times are BIGINT Unix milliseconds, durations BIGINT milliseconds;
-- * flags are BIGINT 0/1 with a CHECK, not BOOLEAN: sqlx-sqlite 0.9 reports a column
--   declared BOOLEAN as its `Bool` type, which the `Any` driver refuses to decode;
-- * binary values are BYTEA (SQLite stores them as BLOBs whatever the declared name);
-- * references are foreign keys with ON DELETE RESTRICT. The store checks every
--   reference and every use itself first, to give a message naming the objects; the
--   keys are the backstop.

-- One row. Every admin write bumps `version` first: the row lock serialises all writes
-- across replicas, and replicas reload their configuration when the number changes.
CREATE TABLE config_meta (
    singleton BIGINT PRIMARY KEY CHECK (singleton = 1),
    version BIGINT NOT NULL,
    -- 1 once the default tiers and the BaseLinker profile were inserted.
    seeded BIGINT NOT NULL CHECK (seeded IN (0, 1))
);

INSERT INTO config_meta (singleton, version, seeded) VALUES (1, 0, 0);

CREATE TABLE upstreams (
    id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    limit_per_window BIGINT NOT NULL CHECK (limit_per_window > 0),
    window_ms BIGINT NOT NULL CHECK (window_ms > 0),
    safety_margin DOUBLE PRECISION NOT NULL,
    block_duration_ms BIGINT NOT NULL CHECK (block_duration_ms >= 0),
    -- One code per line (codes hold no control characters).
    rate_limit_error_codes TEXT NOT NULL,
    create_time_ms BIGINT NOT NULL,
    update_time_ms BIGINT NOT NULL
);

CREATE TABLE pools (
    id TEXT PRIMARY KEY,
    upstream_id TEXT NOT NULL REFERENCES upstreams (id) ON DELETE RESTRICT,
    display_name TEXT NOT NULL,
    create_time_ms BIGINT NOT NULL,
    update_time_ms BIGINT NOT NULL
);

CREATE TABLE tiers (
    id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    guaranteed_per_window BIGINT NOT NULL CHECK (guaranteed_per_window >= 0),
    burst_per_window BIGINT NOT NULL CHECK (burst_per_window >= 0),
    shared_access TEXT NOT NULL CHECK (shared_access IN ('priority', 'normal', 'limited')),
    weight DOUBLE PRECISION NOT NULL CHECK (weight > 0),
    create_time_ms BIGINT NOT NULL,
    update_time_ms BIGINT NOT NULL
);

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    tier_id TEXT NOT NULL REFERENCES tiers (id) ON DELETE RESTRICT,
    pool_id TEXT REFERENCES pools (id) ON DELETE RESTRICT,
    weight_override DOUBLE PRECISION,
    guaranteed_override BIGINT CHECK (guaranteed_override >= 0),
    burst_override BIGINT CHECK (burst_override >= 0),
    create_time_ms BIGINT NOT NULL,
    update_time_ms BIGINT NOT NULL
);

CREATE INDEX tenants_tier_id ON tenants (tier_id);
CREATE INDEX tenants_pool_id ON tenants (pool_id);

-- A token is owned by exactly one of: a shared pool, or one tenant (dedicated).
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    upstream_id TEXT NOT NULL REFERENCES upstreams (id) ON DELETE RESTRICT,
    display_name TEXT NOT NULL,
    pool_id TEXT REFERENCES pools (id) ON DELETE RESTRICT,
    dedicated_tenant_id TEXT REFERENCES tenants (id) ON DELETE RESTRICT,
    disabled BIGINT NOT NULL CHECK (disabled IN (0, 1)),
    -- The master key the secret is sealed with, and nonce || ciphertext || tag.
    key_id TEXT NOT NULL,
    sealed_secret BYTEA NOT NULL,
    create_time_ms BIGINT NOT NULL,
    update_time_ms BIGINT NOT NULL,
    CHECK (
        (pool_id IS NOT NULL AND dedicated_tenant_id IS NULL)
        OR (pool_id IS NULL AND dedicated_tenant_id IS NOT NULL)
    )
);

CREATE INDEX tokens_upstream_id ON tokens (upstream_id);
CREATE INDEX tokens_pool_id ON tokens (pool_id);
CREATE INDEX tokens_dedicated_tenant_id ON tokens (dedicated_tenant_id);

-- Never the secret part of a key: only its SHA-256.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'worker')),
    secret_hash BYTEA NOT NULL,
    create_time_ms BIGINT NOT NULL
);

-- The tenants a worker key may act for. Deleting a tenant removes it from every key's
-- scope (the store refuses the delete if a key would be left with no tenant at all).
CREATE TABLE api_key_tenants (
    api_key_id TEXT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    PRIMARY KEY (api_key_id, tenant_id)
);

CREATE INDEX api_key_tenants_tenant_id ON api_key_tenants (tenant_id);
