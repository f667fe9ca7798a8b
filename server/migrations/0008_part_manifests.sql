-- The part manifest of the latest verified object of each store's share: each part's plaintext
-- digest, lengths and CRC64NVME, from which the next fetch of the share copies unchanged parts.
CREATE TABLE part_manifests (
    client_id   TEXT    NOT NULL,
    share       TEXT    NOT NULL,
    finished_ms INTEGER NOT NULL,
    format      INTEGER NOT NULL,
    record      TEXT    NOT NULL,
    PRIMARY KEY (client_id, share)
);
