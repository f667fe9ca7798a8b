-- Collections: one file asked of many stores. A collection's rows are its stores, one each,
-- so that no store is asked twice in one collection.
CREATE TABLE collections (
    id TEXT PRIMARY KEY,
    -- The target in its REST form (JSON), as the operator gave it.
    target TEXT NOT NULL,
    share TEXT NOT NULL,
    max_concurrent INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    created_from TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    -- open, expired or cancelled.
    state TEXT NOT NULL
);
CREATE INDEX collections_by_created ON collections (created_ms);
CREATE INDEX collections_by_state ON collections (state);

CREATE TABLE collection_rows (
    collection_id TEXT NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    client_id TEXT NOT NULL,
    -- waiting, running, completed, failed, cancelled or not_reached.
    state TEXT NOT NULL,
    upload_id TEXT,
    object_key TEXT,
    size INTEGER,
    sha256 TEXT,
    error_code TEXT,
    error_message TEXT,
    matched_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    PRIMARY KEY (collection_id, client_id)
) WITHOUT ROWID;
CREATE INDEX collection_rows_by_state ON collection_rows (collection_id, state);
