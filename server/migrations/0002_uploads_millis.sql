-- Creation time as integer milliseconds, so that it sorts as time (as text, "...:01Z" sorted after
-- "...:01.5Z"), and the format of each stored record, so that a record written by an older
-- release is read as what it is. Rows from release 1 keep their documents, marked format 1.
CREATE TABLE uploads_v2 (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    terminal INTEGER NOT NULL,
    format INTEGER NOT NULL,
    record TEXT NOT NULL
);
INSERT INTO uploads_v2 (id, client_id, created_ms, terminal, format, record)
SELECT id, client_id,
       CAST(round((julianday(created_at) - 2440587.5) * 86400000.0) AS INTEGER),
       terminal, 1, record
FROM uploads;
DROP TABLE uploads;
ALTER TABLE uploads_v2 RENAME TO uploads;
CREATE INDEX uploads_by_client ON uploads (client_id, created_ms);
CREATE INDEX uploads_unfinished ON uploads (terminal, created_ms);
