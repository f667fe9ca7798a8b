-- The claim (a connection epoch) under which the replica that last saved an upload held its
-- store; as SQLite's 0010_upload_epoch.
ALTER TABLE uploads ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
