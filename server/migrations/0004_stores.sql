-- The store inventory: every agent the server has ever seen, whether connected now or not.
CREATE TABLE stores (
    client_id        TEXT PRIMARY KEY,
    labels           TEXT NOT NULL,
    agent_version    TEXT NOT NULL,
    protocol_version INTEGER NOT NULL,
    first_seen_ms    INTEGER NOT NULL,
    last_seen_ms     INTEGER NOT NULL
);
