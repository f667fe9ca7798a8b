-- Schedules: a cron pattern in a time zone, and the collection each firing creates.
CREATE TABLE schedules (
    id TEXT PRIMARY KEY,
    cron TEXT NOT NULL,
    time_zone TEXT NOT NULL,
    -- The collection template in its REST form (JSON).
    template TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_from TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    -- The latest firing handled (the scheduled moment, not when it ran).
    last_fired_ms INTEGER NOT NULL
);

-- The schedule that created a collection, and the firing it was for.
ALTER TABLE collections ADD COLUMN schedule_id TEXT;
ALTER TABLE collections ADD COLUMN fired_ms INTEGER;
CREATE INDEX collections_by_schedule ON collections (schedule_id, fired_ms);
