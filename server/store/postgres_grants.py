"""API keys and share tokens on PostgreSQL (the same `PostgresDatabase` as the others)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from .postgres_db import PostgresDatabase
from .records import ApiKeyRecord, ShareRecord, epoch_time, iso_time


class PostgresGrants:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def create_api_key(
        self, key_id: str, user_id: int, name: str, scopes: Sequence[str], secret_hash: str, at: str
    ) -> None:
        await self._db.execute(
            "INSERT INTO api_keys (id, user_id, name, scopes, secret_hash, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            key_id,
            user_id,
            name,
            " ".join(scopes),
            secret_hash,
            at,
        )

    async def count_api_keys(self, user_id: int) -> int:
        return int(
            await self._db.fetchval(
                "SELECT COUNT(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL", user_id
            )
        )

    async def list_api_keys(self, user_id: int) -> list[ApiKeyRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL"
            " ORDER BY created_at, id",
            user_id,
        )
        return [_key(row) for row in rows]

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        row = await self._db.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
        return None if row is None else _key(row)

    async def revoke_api_key(self, key_id: str, user_id: int, at: str) -> bool:
        changed = await self._db.execute(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND user_id = $3"
            " AND revoked_at IS NULL",
            at,
            key_id,
            user_id,
        )
        return changed > 0

    async def touch_api_key(self, key_id: str, at: str) -> None:
        await self._db.execute("UPDATE api_keys SET last_used_at = $1 WHERE id = $2", at, key_id)

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
            " VALUES ($1, $2, $3, $4, $5, $6)",
            share_id,
            task_id,
            user_id,
            secret_hash,
            created_at,
            iso_time(expires_at),
        )

    async def count_live_shares(self, task_id: str, now: float) -> int:
        return int(
            await self._db.fetchval(
                "SELECT COUNT(*) FROM share_tokens WHERE task_id = $1 AND revoked_at IS NULL"
                " AND expires_at > $2",
                task_id,
                iso_time(now),
            )
        )

    async def get_share(self, share_id: str) -> ShareRecord | None:
        row = await self._db.fetchrow("SELECT * FROM share_tokens WHERE id = $1", share_id)
        return None if row is None else _share(row)

    async def revoke_shares(self, task_id: str, at: str) -> list[str]:
        async def revoke(conn: asyncpg.Connection) -> list[str]:
            rows = await conn.fetch(
                "UPDATE share_tokens SET revoked_at = $1 WHERE task_id = $2"
                " AND revoked_at IS NULL RETURNING id",
                at,
                task_id,
            )
            return [row[0] for row in rows]

        return await self._db.write(revoke)

    async def purge(self, answers_before: str, now: float, limit: int) -> int:
        async def purge(conn: asyncpg.Connection) -> int:
            answers = await conn.execute(
                "DELETE FROM idempotency_keys WHERE (user_id, key) IN (SELECT user_id, key"
                " FROM idempotency_keys WHERE created_at < $1 LIMIT $2)",
                answers_before,
                limit,
            )
            shares = await conn.execute(
                "DELETE FROM share_tokens WHERE id IN (SELECT id FROM share_tokens"
                " WHERE expires_at <= $1 OR revoked_at IS NOT NULL LIMIT $2)",
                iso_time(now),
                limit,
            )
            return int(answers.split()[-1]) + int(shares.split()[-1])

        return await self._db.write(purge)


def _key(row: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        scopes=tuple(row["scopes"].split()),
        secret_hash=row["secret_hash"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked=row["revoked_at"] is not None,
    )


def _share(row: asyncpg.Record) -> ShareRecord:
    return ShareRecord(
        id=row["id"],
        task_id=row["task_id"],
        user_id=row["user_id"],
        secret_hash=row["secret_hash"],
        expires_at=epoch_time(row["expires_at"]),
        revoked=row["revoked_at"] is not None,
    )
