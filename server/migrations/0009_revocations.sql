-- Per-store revocations, moved here from revocations.json in the data directory (which a start
-- still reads once, and imports): every agent token of a store issued before not_before (unix
-- seconds) is refused.
CREATE TABLE store_revocations (
    client_id  TEXT PRIMARY KEY,
    not_before INTEGER NOT NULL
);
