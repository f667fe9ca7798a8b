-- The compression a collection asks of every store (`auto`, `zstd` or `none`).
ALTER TABLE collections ADD COLUMN compression TEXT NOT NULL DEFAULT 'auto';
