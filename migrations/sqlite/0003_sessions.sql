-- Login sessions, and the identity of this database.
--
-- A token names its session (`sid`) and this database (`db` = meta.instance_id): after the
-- database is reset or restored (the JWT secret beside it survives), old tokens name an
-- unknown instance or session and are refused, instead of acting as whoever now has their
-- user id.
CREATE TABLE sessions (
    id         TEXT    PRIMARY KEY,             -- 192 random bits, URL-safe base64
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TEXT    NOT NULL,                -- the login
    expires_at TEXT    NOT NULL,                -- login + --session-max-age: no refresh after
    revoked_at TEXT                             -- logout, password change, `users remove`
);                                              -- a rowid table: rowid orders the logins
CREATE INDEX sessions_by_user ON sessions (user_id);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
-- Created with the database (or when an older one is migrated), never changed.
INSERT INTO meta (key, value) VALUES ('instance_id', lower(hex(randomblob(16))));
