-- The uploads table as the first release created it: one JSON document per upload, indexed by
-- client and by creation time as RFC 3339 text.
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    terminal INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_by_client ON uploads (client_id, created_at);
CREATE INDEX IF NOT EXISTS uploads_unfinished ON uploads (terminal, created_at);
