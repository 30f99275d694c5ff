"""API keys and share tokens on SQLite (the same `Database` as the other stores)."""

from __future__ import annotations

from collections.abc import Sequence

from .records import ApiKeyRecord, ShareRecord, epoch_time, iso_time
from .sqlite_db import Database


class SQLiteGrants:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create_api_key(
        self, key_id: str, user_id: int, name: str, scopes: Sequence[str], secret_hash: str, at: str
    ) -> None:
        await self._db.execute(
            "INSERT INTO api_keys (id, user_id, name, scopes, secret_hash, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key_id, user_id, name, " ".join(scopes), secret_hash, at),
        )

    async def count_api_keys(self, user_id: int) -> int:
        rows = await self._db.fetch(
            "SELECT COUNT(*) FROM api_keys WHERE user_id = ? AND revoked_at IS NULL", (user_id,)
        )
        return int(rows[0][0])

    async def list_api_keys(self, user_id: int) -> list[ApiKeyRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM api_keys WHERE user_id = ? AND revoked_at IS NULL"
            " ORDER BY created_at, id",
            (user_id,),
        )
        return [_key(row) for row in rows]

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await self._db.fetch("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return _key(rows[0]) if rows else None

    async def revoke_api_key(self, key_id: str, user_id: int, at: str) -> bool:
        changed = await self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND user_id = ?"
            " AND revoked_at IS NULL",
            (at, key_id, user_id),
        )
        return changed > 0

    async def touch_api_key(self, key_id: str, at: str) -> None:
        await self._db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (at, key_id))

    async def create_share(
        self,
        share_id: str,
        task_id: str,
        user_id: int,
        secret_hash: str,
        created_at: str,
        expires_at: float,
    ) -> None:
        await self._db.execute(
            "INSERT INTO share_tokens (id, task_id, user_id, secret_hash, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (share_id, task_id, user_id, secret_hash, created_at, iso_time(expires_at)),
        )

    async def count_live_shares(self, task_id: str, now: float) -> int:
        rows = await self._db.fetch(
            "SELECT COUNT(*) FROM share_tokens WHERE task_id = ? AND revoked_at IS NULL"
            " AND expires_at > ?",
            (task_id, iso_time(now)),
        )
        return int(rows[0][0])

    async def get_share(self, share_id: str) -> ShareRecord | None:
        rows = await self._db.fetch("SELECT * FROM share_tokens WHERE id = ?", (share_id,))
        return _share(rows[0]) if rows else None

    async def revoke_shares(self, task_id: str, at: str) -> list[str]:
        def revoke(conn):  # type: ignore[no-untyped-def]
            rows = conn.execute(
                "UPDATE share_tokens SET revoked_at = ? WHERE task_id = ?"
                " AND revoked_at IS NULL RETURNING id",
                (at, task_id),
            ).fetchall()
            return [row[0] for row in rows]

        return await self._db.write(revoke)

    async def purge(self, answers_before: str, now: float, limit: int) -> int:
        def purge(conn):  # type: ignore[no-untyped-def]
            answers = conn.execute(
                "DELETE FROM idempotency_keys WHERE (user_id, key) IN (SELECT user_id, key"
                " FROM idempotency_keys WHERE created_at < ? LIMIT ?)",
                (answers_before, limit),
            ).rowcount
            shares = conn.execute(
                "DELETE FROM share_tokens WHERE id IN (SELECT id FROM share_tokens"
                " WHERE expires_at <= ? OR revoked_at IS NOT NULL LIMIT ?)",
                (iso_time(now), limit),
            ).rowcount
            return answers + shares

        return await self._db.write(purge)


def _key(row: object) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"],  # type: ignore[index]
        user_id=row["user_id"],  # type: ignore[index]
        name=row["name"],  # type: ignore[index]
        scopes=tuple(row["scopes"].split()),  # type: ignore[index]
        secret_hash=row["secret_hash"],  # type: ignore[index]
        created_at=row["created_at"],  # type: ignore[index]
        last_used_at=row["last_used_at"],  # type: ignore[index]
        revoked=row["revoked_at"] is not None,  # type: ignore[index]
    )


def _share(row: object) -> ShareRecord:
    return ShareRecord(
        id=row["id"],  # type: ignore[index]
        task_id=row["task_id"],  # type: ignore[index]
        user_id=row["user_id"],  # type: ignore[index]
        secret_hash=row["secret_hash"],  # type: ignore[index]
        expires_at=epoch_time(row["expires_at"]),  # type: ignore[index]
        revoked=row["revoked_at"] is not None,  # type: ignore[index]
    )
