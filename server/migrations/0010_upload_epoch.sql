-- The claim (a connection epoch) under which the replica that last saved an upload held its
-- store. A save under an older claim than the row's is refused, so a replica that lost a store
-- to another cannot overwrite what the new one wrote. One server saves under 0.
ALTER TABLE uploads ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
