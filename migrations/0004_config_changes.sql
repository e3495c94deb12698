-- The change log (src/store/sql/changes.rs): under each committed write's version, one
-- row of kind 'write' and one row per object it created, updated or deleted, so that a
-- replica reloads only the objects changed since its snapshot's version. Rows older than
-- the last 100,000 versions are pruned by the writes; a replica further behind, or one
-- that finds a version without its 'write' row, loads everything.
CREATE TABLE config_changes (
    version BIGINT NOT NULL,
    -- 'write', or the kind of the object: upstream, token, pool, tier, tenant, api_key.
    kind TEXT NOT NULL,
    -- The object's id ('' for the 'write' row).
    object_id TEXT NOT NULL,
    PRIMARY KEY (version, kind, object_id)
);
