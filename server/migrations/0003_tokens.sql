-- The token ledger: every token the server signed (never the token itself). GET /tokens lists
-- it, DELETE /tokens/{jti} marks a token revoked, and a signing key may be retired once no token
-- it signed is still valid.
CREATE TABLE tokens (
    jti        TEXT PRIMARY KEY,
    kid        TEXT NOT NULL,
    subject    TEXT NOT NULL,
    role       TEXT NOT NULL,
    issued_by  TEXT NOT NULL,
    issued_at  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX tokens_by_key ON tokens (kid, expires_at);
CREATE INDEX tokens_by_expiry ON tokens (expires_at);
