-- The audit trail of rebalancing (src/store/sql/rebalance.rs): one row per tenant moved
-- from one pool to another by PlanRebalance/ApplyRebalance or the automatic mode, kept
-- after the tenant or the pools are deleted. `version` is the configuration version of
-- the write that moved the tenant (each move is a write of its own), so it orders the
-- rows and names them.
CREATE TABLE tenant_moves (
    version BIGINT PRIMARY KEY,
    upstream_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    from_pool_id TEXT NOT NULL,
    to_pool_id TEXT NOT NULL,
    -- Why, for people (the plan's reason).
    reason TEXT NOT NULL,
    -- 'manual' (ApplyRebalance) or 'automatic'.
    mode TEXT NOT NULL,
    -- Who: the admin API key's id, or 'replica <id>' for the automatic mode.
    actor TEXT NOT NULL,
    move_time_ms BIGINT NOT NULL
);
CREATE INDEX tenant_moves_by_upstream ON tenant_moves (upstream_id, version);
CREATE INDEX tenant_moves_by_tenant ON tenant_moves (tenant_id, version);
