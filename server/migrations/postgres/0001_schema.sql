-- The whole schema, as SQLite's migrations 0001-0009 leave it, for a new PostgreSQL database.
-- Integers are BIGINT (unix milliseconds or seconds, sizes, 0/1 flags); records are JSON text.

-- One document per upload, with the columns it is indexed by.
CREATE TABLE uploads (
    id         TEXT PRIMARY KEY,
    client_id  TEXT   NOT NULL,
    created_ms BIGINT NOT NULL,
    terminal   BIGINT NOT NULL,
    format     BIGINT NOT NULL,
    record     TEXT   NOT NULL
);
CREATE INDEX uploads_by_client ON uploads (client_id, created_ms);
CREATE INDEX uploads_unfinished ON uploads (terminal, created_ms);

-- The token ledger: every token the server signed (never the token itself).
CREATE TABLE tokens (
    jti        TEXT PRIMARY KEY,
    kid        TEXT   NOT NULL,
    subject    TEXT   NOT NULL,
    role       TEXT   NOT NULL,
    issued_by  TEXT   NOT NULL,
    issued_at  BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX tokens_by_key ON tokens (kid, expires_at);
CREATE INDEX tokens_by_expiry ON tokens (expires_at);

-- The store inventory: every agent any replica has seen.
CREATE TABLE stores (
    client_id        TEXT PRIMARY KEY,
    labels           TEXT   NOT NULL,
    agent_version    TEXT   NOT NULL,
    protocol_version BIGINT NOT NULL,
    first_seen_ms    BIGINT NOT NULL,
    last_seen_ms     BIGINT NOT NULL
);

-- Collections and their rows (one per store).
CREATE TABLE collections (
    id             TEXT PRIMARY KEY,
    target         TEXT   NOT NULL,
    share          TEXT   NOT NULL,
    max_concurrent BIGINT NOT NULL,
    created_by     TEXT   NOT NULL,
    created_from   TEXT   NOT NULL,
    created_ms     BIGINT NOT NULL,
    expires_ms     BIGINT NOT NULL,
    state          TEXT   NOT NULL,
    schedule_id    TEXT,
    fired_ms       BIGINT,
    compression    TEXT   NOT NULL DEFAULT 'auto'
);
CREATE INDEX collections_by_created ON collections (created_ms);
CREATE INDEX collections_by_state ON collections (state);
CREATE INDEX collections_by_schedule ON collections (schedule_id, fired_ms);

CREATE TABLE collection_rows (
    collection_id TEXT NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    client_id     TEXT NOT NULL,
    state         TEXT NOT NULL,
    upload_id     TEXT,
    object_key    TEXT,
    size          BIGINT,
    sha256        TEXT,
    error_code    TEXT,
    error_message TEXT,
    matched_ms    BIGINT NOT NULL,
    finished_ms   BIGINT,
    PRIMARY KEY (collection_id, client_id)
);
CREATE INDEX collection_rows_by_state ON collection_rows (collection_id, state);

-- Schedules: a cron pattern in a time zone, and the collection each firing creates.
CREATE TABLE schedules (
    id            TEXT PRIMARY KEY,
    cron          TEXT   NOT NULL,
    time_zone     TEXT   NOT NULL,
    template      TEXT   NOT NULL,
    created_by    TEXT   NOT NULL,
    created_from  TEXT   NOT NULL,
    created_ms    BIGINT NOT NULL,
    last_fired_ms BIGINT NOT NULL
);

-- The part manifest of the latest verified object of each store's share.
CREATE TABLE part_manifests (
    client_id   TEXT   NOT NULL,
    share       TEXT   NOT NULL,
    finished_ms BIGINT NOT NULL,
    format      BIGINT NOT NULL,
    record      TEXT   NOT NULL,
    PRIMARY KEY (client_id, share)
);

-- Per-store revocations.
CREATE TABLE store_revocations (
    client_id  TEXT PRIMARY KEY,
    not_before BIGINT NOT NULL
);
