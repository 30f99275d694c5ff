"""Where the bearer credential comes from, and how a refused one is replaced."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

#: A token, or a function (sync or async) returning the current one. It is called once at
#: the start and again whenever the server refuses the token (HTTP 401, WebSocket 4401),
#: so it can hand out a fresh one.
TokenSource = str | Callable[[], str | Awaitable[str]]

#: Called with (username, password); returns an access token (the client's own login).
LoginFn = Callable[[str, str], Awaitable[str]]


class Credentials:
    """One of: an API key, a token or token source, or a username and password.

    `current()` returns the credential to send; `renew(refused)` tries to get a different
    one after the server refused `refused`, and returns False when there is no way to
    (an API key, a fixed token, or a source that gave the same token again).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        token: TokenSource | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        given = [api_key is not None, token is not None, username is not None]
        if sum(given) > 1:
            raise ValueError("give one of api_key, token, or username/password")
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        self._api_key = api_key
        self._source = token
        self._username = username
        self._password = password
        #: The bearer credential in use (None until first needed).
        self._current: str | None = api_key if api_key is not None else None
        if isinstance(token, str):
            self._current = token
        #: Set by the client: how to log in with a username and password.
        self.login: LoginFn | None = None

    @property
    def present(self) -> bool:
        return any(x is not None for x in (self._api_key, self._source, self._username))

    @property
    def renewable(self) -> bool:
        """True if a refused credential can be replaced (a token source, or a password)."""
        return callable(self._source) or self._username is not None

    async def current(self) -> str | None:
        """The credential to send now (logging in or asking the source the first time)."""
        if self._current is None and self.present:
            await self._fetch()
        return self._current

    async def renew(self, refused: str | None) -> bool:
        """Replace `refused` (the credential the server just refused); False if impossible."""
        if not self.renewable:
            return False
        if self._current != refused and self._current is not None:
            return True  # someone else renewed it meanwhile
        await self._fetch()
        return self._current is not None and self._current != refused

    async def _fetch(self) -> None:
        if callable(self._source):
            value = self._source()
            if inspect.isawaitable(value):
                value = await value
            self._current = value or None
        elif self._username is not None and self._password is not None:
            assert self.login is not None, "the client sets Credentials.login"
            self._current = await self.login(self._username, self._password)
