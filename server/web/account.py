"""Account routes under /api/v1/auth: register, login, refresh, me, logout, password.

Register and login are open to anyone, so each is guarded before it costs anything:
`--registration`, the per-address `--auth-rate`, a 4 KiB body read no further than that,
a bounded form, the per-username login throttle, and only then a password hash, on the
hashing threads' bounded queue (503 when full).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from .. import schemas
from ..auth import HashBusy, bearer_token
from ..credentials import is_credential
from ..errors import BadRequest, Conflict, Forbidden, TooManyRequests, Unauthorized
from ..models import utc_now
from ..store import UsernameTaken
from .bodies import json_object, validate
from .guards import FORM_FIELDS_MAX, authenticate, limit_attempts, read_small_body
from .keys import (
    accounts_key,
    config_key,
    login_throttle_key,
    metrics_key,
    passwords_key,
    sessions_key,
    tokens_key,
)
from .middleware import reads_own_body

routes = web.RouteTableDef()

_CHANGE_PASSWORD = schemas.ChangePassword()
_CREDENTIALS = schemas.Credentials()
_LOGIN_FORM = schemas.LoginForm()
_LOGOUT_QUERY = schemas.LogoutQuery()
_REGISTER = schemas.Register()


async def _credentials(request: web.Request) -> dict[str, Any]:
    """{username, password} from a JSON body or an OAuth2 password form."""
    body = await read_small_body(request)
    # A form, unless the body is plainly JSON (curl -d sends JSON as a form).
    is_form = request.content_type == "application/x-www-form-urlencoded"
    if not is_form or body.lstrip().startswith(b"{"):
        return validate(_CREDENTIALS, json_object(body))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("form body is not UTF-8") from None
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=FORM_FIELDS_MAX)
    except ValueError:
        raise BadRequest(f"form body has more than {FORM_FIELDS_MAX} fields") from None
    return validate(_LOGIN_FORM, dict(pairs))


def _throttle(request: web.Request, username: str) -> None:
    """The per-username login throttle: 429 `login_throttled`, before any hashing."""
    try:
        request.app[login_throttle_key].attempt(username)
    except TooManyRequests:
        request.app[metrics_key].refusals.note("login_throttled")
        raise


def _wrong_credentials() -> Unauthorized:
    return Unauthorized("wrong username or password", code="invalid_credentials")


def _token_response(token: str, expires_in: int) -> web.Response:
    return web.json_response(
        {"access_token": token, "token_type": "bearer", "expires_in": expires_in}
    )


async def _rehash(request: web.Request, user_id: int, stored: str, password: str) -> None:
    """Store the password again at today's cost (legacy scrypt or a weaker argon2id)."""
    try:
        new_hash = await request.app[passwords_key].hash(password)
    except HashBusy:
        return  # the login stands; the rehash waits for a quieter login
    await request.app[accounts_key].replace_password_hash(user_id, stored, new_hash)


@routes.post("/api/v1/auth/register")
@reads_own_body
async def register(request: web.Request) -> web.Response:
    if request.app[config_key].registration == "closed":
        raise Forbidden(
            "registration is closed; an operator adds accounts", code="registration_closed"
        )
    limit_attempts(request)
    data = validate(_REGISTER, json_object(await read_small_body(request)))
    accounts = request.app[accounts_key]
    taken = Conflict(
        "username already taken", code="username_taken", fields={"username": ["Already taken."]}
    )
    if await accounts.username_taken(data["username"]):
        raise taken  # no hash spent on a name that cannot be had
    password_hash = await request.app[passwords_key].hash(data["password"])
    try:
        user = await accounts.create_user(data["username"], password_hash, utc_now())
    except UsernameTaken:
        raise taken from None
    return web.json_response(user.to_dict(), status=201)


@routes.post("/api/v1/auth/login")
@reads_own_body
async def login(request: web.Request) -> web.Response:
    limit_attempts(request)
    data = await _credentials(request)
    username, password = data["username"], data["password"]
    _throttle(request, username)
    throttle = request.app[login_throttle_key]
    found = await request.app[accounts_key].find_credentials(username)
    stored = found[1] if found is not None else None
    try:
        verified = await request.app[passwords_key].verify(password, stored)
    except HashBusy:
        throttle.forgive(username)  # not a guess: nothing was checked
        raise
    if found is None or not verified.ok:
        raise _wrong_credentials()
    throttle.succeeded(username)
    user = found[0]
    if verified.needs_rehash and stored is not None:
        await _rehash(request, user.id, stored, password)
    session = await request.app[sessions_key].create(user.id)
    return _token_response(*request.app[tokens_key].issue(user.id, session.id, session.expires_at))


@routes.post("/api/v1/auth/refresh")
@reads_own_body
async def refresh(request: web.Request) -> web.Response:
    """A new token for the same session; 401 `session_expired` once the session ended."""
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise Unauthorized("missing bearer token", code="missing_token")
    if is_credential(token):
        raise Forbidden("only a login token can be refreshed", code="insufficient_scope")
    tokens, sessions = request.app[tokens_key], request.app[sessions_key]
    try:
        identity = tokens.verify(token)
    except Unauthorized as exc:
        if exc.code != "token_expired":
            raise
        # Expired: say so, unless the whole session is over (then nothing can refresh it).
        await sessions.check(tokens.verify_expired(token))
        raise
    session_end = await sessions.check(identity)
    await read_small_body(request)  # ignored, but no more than the limit is read
    token, expires_in = tokens.issue(identity.user_id, identity.session_id, session_end)
    if expires_in < 1:  # the session ends within the second
        raise Unauthorized("session expired: log in again", code="session_expired")
    return _token_response(token, expires_in)


@routes.get("/api/v1/auth/me")
async def me(request: web.Request) -> web.Response:
    """The user a login token or API key acts for."""
    identity = await authenticate(request, allow_query=False)
    user = await request.app[accounts_key].get_user(identity.user_id)
    if user is None:
        raise Unauthorized("unknown user", code="invalid_token")
    return web.json_response(user.to_dict())


@routes.post("/api/v1/auth/logout")
@reads_own_body
async def logout(request: web.Request) -> web.Response:
    """End the token's session (`?all=true`: every session of the user); 204."""
    identity = await authenticate(request, allow_query=False, login_only=True)
    query = validate(_LOGOUT_QUERY, dict(request.query))
    await read_small_body(request)
    sessions = request.app[sessions_key]
    if query["all"]:
        await sessions.revoke_all(identity.user_id)
    else:
        await sessions.revoke(identity.session_id)
    return web.Response(status=204)


@routes.post("/api/v1/auth/password")
@reads_own_body
async def change_password(request: web.Request) -> web.Response:
    """{current_password, new_password}: set the new one and end every session; 204."""
    identity = await authenticate(request, allow_query=False, login_only=True)
    limit_attempts(request)
    data = validate(_CHANGE_PASSWORD, json_object(await read_small_body(request)))
    accounts, passwords = request.app[accounts_key], request.app[passwords_key]
    user = await accounts.get_user(identity.user_id)
    stored = await accounts.password_hash(identity.user_id)
    if user is None or stored is None:
        raise Unauthorized("unknown user", code="invalid_token")
    # A stolen token must not become a password-guessing oracle: throttled like login.
    _throttle(request, user.username)
    throttle = request.app[login_throttle_key]
    try:
        verified = await passwords.verify(data["current_password"], stored)
    except HashBusy:
        throttle.forgive(user.username)
        raise
    if not verified.ok:
        raise Unauthorized("wrong current password", code="invalid_credentials")
    throttle.succeeded(user.username)
    new_hash = await passwords.hash(data["new_password"])
    ended = await accounts.change_password(user.id, new_hash, time.time())
    request.app[sessions_key].ended(ended)
    return web.Response(status=204)
