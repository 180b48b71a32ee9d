"""Who is calling: bearer tokens (the cloud's own EdDSA JWTs or an external identity provider's,
verified by its JWKS), service API keys, and the `Principal` with its role, sites and rights.

Token signing keys live in the cloud key directory beside the HPKE and ack keys, one line each
(see sync.keys): ``jwt-<kid>.key`` (0600), ``jwt-<kid>.pub``, ``jwt.current``. Every key stays
valid for verification until its file is removed or it is revoked (ops.revoked_token_keys), so
rotating (a new current key) does not invalidate tokens already handed out; the key id travels
in the token header (`kid`). Both take effect on a running process within two refresh periods
(`Revocations`).

Roles and what they may do (API keys are further limited to their scopes):

    read   viewer, engineer, admin, service     every GET under /v1
    write  engineer, admin, service             every other method under /v1
    pii    engineer, admin                      operator identities in clear
    ops    admin                                performance statistics, audit trail
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import jwt
import psycopg
import structlog
from cachetools import LRUCache
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi.concurrency import run_in_threadpool
from psycopg_pool import ConnectionPool
from starlette.requests import Request

from cloud_api.access import headers as request_headers
from cloud_api.access.revocations import CredentialStamp
from cloud_api.config import JwksSettings, Role, SecuritySettings
from cloud_api.problems import DATABASE_RETRY_AFTER_S, Problem
from common.duration import parse_timedelta
from common.keydir import (
    ensure_directory,
    load_ring,
    read_one_current,
    store_current,
    write_private_line,
    write_public_lines,
)
from sync.keys import (
    ed25519_key_id,
    ed25519_line,
    load_signing_key,
)

log = structlog.get_logger("cloud_api.auth")

ROLES: tuple[Role, ...] = get_args(Role)
Permission = Literal["read", "write", "pii", "ops"]
PERMISSIONS: dict[Permission, frozenset[Role]] = {
    "read": frozenset({"viewer", "engineer", "admin", "service"}),
    "write": frozenset({"engineer", "admin", "service"}),
    "pii": frozenset({"engineer", "admin"}),
    "ops": frozenset({"admin"}),
}
SCOPES: tuple[Permission, ...] = get_args(Permission)
ALL_SITES = "*"
# Site ids end up in a comma-separated database setting: no commas, no spaces, bounded.
SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
ALGORITHM = "EdDSA"
API_KEY = re.compile(r"fgw_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="factory-edge-gateway"'}


class AuthError(Exception):
    """A credential cannot be issued or a key file cannot be used."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `sites` None means every site."""

    subject: str
    role: Role
    sites: tuple[str, ...] | None
    kind: Literal["token", "external", "api_key"]
    credential_id: str
    scopes: frozenset[str] | None = None
    expires: datetime | None = field(default=None, compare=False)

    def can(self, permission: Permission) -> bool:
        if self.role not in PERMISSIONS[permission]:
            return False
        return self.scopes is None or permission in self.scopes

    def sees(self, site: str) -> bool:
        return self.sites is None or site in self.sites

    @property
    def site_list(self) -> list[str] | None:
        """The sites for query functions that take `sites: list[str] | None`."""
        return None if self.sites is None else list(self.sites)

    @property
    def db_scope(self) -> str:
        """The value of the `app.sites` database setting that row-level security reads."""
        return ALL_SITES if self.sites is None else ",".join(self.sites)

    @property
    def rate_key(self) -> str:
        return f"{self.kind}:{self.credential_id}"


def parse_sites(value: Iterable[str]) -> tuple[str, ...] | None:
    """Validate a list of site ids; ``["*"]`` means every site (returned as None)."""
    sites = [s.strip() for s in value if s.strip()]
    if sites == [ALL_SITES]:
        return None
    if not sites:
        raise ValueError("at least one site (or '*') is required")
    for site in sites:
        if not SITE_ID.fullmatch(site):
            raise ValueError(f"invalid site id {site[:70]!r}")
    return tuple(dict.fromkeys(sites))


def parse_role(value: object) -> Role:
    if value not in ROLES:
        raise ValueError(f"unknown role (expected one of {', '.join(ROLES)})")
    return value


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w`, `1d12h`: the grammar of `common.duration`."""
    return parse_timedelta(text)


# --- signing keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenKeyring:
    """The cloud's token signing keys by key id; `current_id` signs new tokens."""

    keys: dict[str, Ed25519PrivateKey] = field(repr=False)
    current_id: str | None

    @classmethod
    def load(cls, directory: Path) -> TokenKeyring:
        keys = load_ring(
            directory, "jwt", load_signing_key, lambda k: ed25519_key_id(k.public_key())
        )
        return cls(keys, read_one_current(directory, "jwt", keys, required=False))

    @functools.cached_property
    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """By key id; derived once per ring (a ring read from the directory is never changed,
        a new one is read instead)."""
        return {kid: k.public_key() for kid, k in self.keys.items()}

    @property
    def current(self) -> tuple[str, Ed25519PrivateKey]:
        if self.current_id is None:
            raise AuthError("no token signing key yet: run `cloud-api tokens rotate-key`")
        return self.current_id, self.keys[self.current_id]


def generate_token_key(directory: Path) -> str:
    """Create a new Ed25519 token signing key and make it current; returns its key id."""
    import base64

    ensure_directory(directory)
    key = Ed25519PrivateKey.generate()
    kid = ed25519_key_id(key.public_key())
    private = "ed25519-private:" + base64.b64encode(key.private_bytes_raw()).decode("ascii")
    write_private_line(directory / f"jwt-{kid}.key", private)
    write_public_lines(directory / f"jwt-{kid}.pub", [ed25519_line(key.public_key())])
    store_current(directory, "jwt", [kid])
    return kid


def issue_token(
    ring: TokenKeyring,
    settings: SecuritySettings,
    *,
    subject: str,
    role: Role,
    sites: Iterable[str],
    ttl: timedelta,
    now: datetime | None = None,
    not_before: datetime | None = None,
) -> tuple[str, dict[str, Any]]:
    """Sign a bearer token; returns (token, claims). The token itself is never logged."""
    parse_role(role)
    scope = parse_sites(sites)
    if ttl.total_seconds() <= 0:
        raise AuthError("the token lifetime must be positive")
    if ttl.total_seconds() > settings.max_token_ttl_seconds:
        raise AuthError(
            f"the token lifetime exceeds the maximum of {settings.max_token_ttl_seconds} s"
        )
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    kid, key = ring.current
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "role": role,
        "sites": [ALL_SITES] if scope is None else list(scope),
        "iat": int(issued.timestamp()),
        "nbf": int((not_before or issued).timestamp()),
        "exp": int((issued + ttl).timestamp()),
        "jti": secrets.token_hex(16),
    }
    token = jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid})
    return token, claims


# --- API keys -------------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    # The secret is 256 random bits, so a fast hash is enough: there is nothing to brute-force
    # that a slow hash would protect.
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def new_api_key() -> tuple[str, str, str]:
    """(full key shown once, public prefix, secret hash to store)."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"fgw_{prefix}_{secret}", prefix, hash_secret(secret)


# --- revoked tokens and signing keys --------------------------------------------------------


class Revocations:
    """Revoked token ids and token signing key ids, as of a credential stamp read recently.

    `refresh()` (blocking) reads the stamp when `refresh_s` has passed and the lists only when
    it moved (cloud_api.revocations), and looks at the key directory's token key files, so a
    key file removed by hand counts as a retired key. Requests do not wait for that while the
    view is younger than two periods: the first request after a period starts one refresh in
    the background and everyone goes on with the view in memory. An older view (no traffic
    for a while, or the database unreachable) is refreshed before a token is accepted. A
    revocation or a removed key file thus takes effect within `refresh_s` under traffic, and
    at the latest after twice that. `on_change` runs after every refresh that found a change.
    """

    def __init__(
        self,
        refresh_s: float,
        pool: Callable[[], ConnectionPool],
        keys_dir: Path,
        on_change: Callable[[], None],
    ) -> None:
        self.refresh_s = refresh_s
        self.pool = pool
        self.keys_dir = keys_dir
        self.on_change = on_change
        self.stamp = CredentialStamp(refresh_s)
        self.jtis: frozenset[str] = frozenset()
        self.kids: frozenset[str] = frozenset()
        self._key_files: tuple[tuple[str, int, int], ...] | None = None
        self._lock = threading.Lock()
        self._refreshing: asyncio.Future[None] | None = None

    def usable(self) -> bool:
        """Whether the view in memory may answer without waiting for the database."""
        return self.stamp.age() < 2 * self.refresh_s

    def kick(self) -> None:
        """Start a background refresh when one is due (needs a running event loop)."""
        if self.stamp.due() and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.ensure_future(self._refresh_in_background())

    async def _refresh_in_background(self) -> None:
        try:
            await run_in_threadpool(self.refresh)
        except Exception as exc:  # the next request tries again; an old view stops serving
            log.warning("revoked credentials not re-read", error=type(exc).__name__)

    def refresh(self) -> None:
        with self._lock:
            if not self.stamp.due():
                return
            moved = self.stamp.refresh(self.pool(), self._load)
            # After the stamp: if reading it fails, the files are looked at next time.
            if self.key_files_changed() or moved:
                self.on_change()

    def key_files_changed(self) -> bool:
        """Whether the token key files differ from the last look (name, size, mtime)."""
        seen: list[tuple[str, int, int]] = []
        try:
            for path in self.keys_dir.glob("jwt*"):
                st = path.stat()
                seen.append((path.name, st.st_size, st.st_mtime_ns))
        except OSError:  # removed while listed, or no directory: read again next time
            seen = []
        files = tuple(sorted(seen))
        changed = files != self._key_files
        self._key_files = files
        return changed

    def _load(self) -> None:
        with self.pool().connection() as conn:
            rows = conn.execute(
                "SELECT jti FROM ops.revoked_tokens "
                "WHERE expires_at IS NULL OR expires_at > now() - interval '1 day'"
            ).fetchall()
            kids = conn.execute("SELECT kid FROM ops.revoked_token_keys").fetchall()
        self.jtis = frozenset(r[0] for r in rows)
        self.kids = frozenset(r[0] for r in kids)


# --- verification ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _unverified(token: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The header and claims of `token`, unverified (what it says of itself: which key and
    issuer verify it); a token seen first is read here twice before its verification. Raises
    PyJWTError when they cannot be read."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return MappingProxyType(header), MappingProxyType(claims)


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, slug="unauthenticated", headers=WWW_AUTHENTICATE)


class VerifiedTokens:
    """Bearer tokens whose signature and claims verified, with the principal they gave.

    Verifying an EdDSA token (two base64 and JSON decodes and a signature check) costs more
    than the rest of a cached API answer; a dashboard or a service sends the same token with
    every request. A remembered token is still checked on each use for what can change after
    its verification: expiry (with the same leeway as the verification) and revocation. Bounded,
    least recently used first out.
    """

    def __init__(self, leeway_s: float, max_entries: int = 10_000) -> None:
        self.leeway_s = leeway_s
        self._items: LRUCache[str, Principal] = LRUCache(max_entries)
        self.generation = 0  # bumped by clear()
        self._lock = threading.Lock()

    def get(self, token: str) -> Principal | None:
        with self._lock:
            principal = self._items.get(token)
        if principal is None:
            return None
        expires = principal.expires
        if expires is not None and expires.timestamp() + self.leeway_s <= time.time():
            with self._lock:
                self._items.pop(token, None)
            return None
        return principal

    def put(self, token: str, principal: Principal, generation: int) -> None:
        """Remember `principal` if no `clear()` came since `generation` was read (a token
        verified against revocations that changed meanwhile must be verified again)."""
        with self._lock:
            if generation == self.generation:
                self._items[token] = principal

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._items.clear()


class Authenticator:
    """Turns the credentials of a request into a `Principal`, or raises a 401 `Problem`."""

    def __init__(
        self,
        settings: SecuritySettings,
        keys_dir: Path,
        pool: Callable[[], ConnectionPool],
    ) -> None:
        self.settings = settings
        self.keys_dir = keys_dir
        self.pool = pool
        self.revocations = Revocations(
            settings.revocation_refresh_seconds, pool, keys_dir, self._credentials_changed
        )
        self.verified = VerifiedTokens(settings.leeway_seconds)
        self._ring: TokenKeyring | None = None
        self._ring_read = -math.inf  # monotonic time of the last read of the key directory
        self._jwks: jwt.PyJWKClient | None = None
        self._jwks_forced = -math.inf  # monotonic time of the last fetch for an unknown kid
        if settings.jwks is not None:
            # No per-kid cache: a key the provider dropped from its set stops verifying when
            # the set is fetched again, not at our next restart.
            self._jwks = jwt.PyJWKClient(
                settings.jwks.url,
                cache_keys=False,
                lifespan=max(1, settings.jwks.cache_seconds),
                timeout=int(max(1.0, settings.jwks.timeout_seconds)),
            )

    def _credentials_changed(self) -> None:
        # Every remembered token is verified again: its key or its id may be revoked now.
        self._ring = None
        self.verified.clear()

    def verify_keys(self) -> dict[str, Ed25519PublicKey]:
        """Token verification keys, read from the key directory when needed."""
        if self._ring is None:
            self._ring_read = time.monotonic()
            self._ring = self._load_ring()
        return self._ring.public_keys

    def _load_ring(self) -> TokenKeyring:
        if not self.keys_dir.is_dir():
            return TokenKeyring({}, None)
        return TokenKeyring.load(self.keys_dir)

    def _refresh_view(self) -> None:
        """Bring the revocations up to date before a token is accepted (blocking)."""
        try:
            self.revocations.refresh()
        except psycopg.Error as exc:
            # Fail closed: a token may have been revoked since the view in memory was read.
            log.warning("revoked credentials cannot be read", error=type(exc).__name__)
            raise Problem(
                503,
                "the database is unavailable, so credentials cannot be checked; retry after "
                "the time in Retry-After",
                slug="database-unavailable",
                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
            ) from None

    async def authenticate(self, request: Request) -> Principal:
        # The request's one parse of its headers (the first of each name, as Starlette's
        # `request.headers.get` reads them).
        headers = request_headers.of(request.scope).values
        api_key = headers.get("x-api-key")
        if api_key is not None:
            return await run_in_threadpool(self._api_key, api_key.strip())
        header = headers.get("authorization")
        if not header:
            raise _unauthorized("a bearer token or an API key is required")
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise _unauthorized("use the Bearer scheme: `Authorization: Bearer <token>`")
        if credential.startswith("fgw_"):
            return await run_in_threadpool(self._api_key, credential)
        if self.revocations.usable():
            self.revocations.kick()
        else:
            await run_in_threadpool(self._refresh_view)
        # A token verified before needs no worker thread: the view of revocations in memory
        # is recent enough (above).
        known = self.verified.get(credential)
        if known is not None:
            return self._still_valid(known)
        if self._verifiable_here(credential):
            # Our own token signed with a key already loaded: verifying it is a little CPU
            # and no I/O, cheaper on the event loop than a hop to a worker thread (a burst of
            # new clients would otherwise queue behind the thread pool).
            return self._token(credential)
        return await run_in_threadpool(self._token, credential)

    def _verifiable_here(self, token: str) -> bool:
        """Whether `token` claims to be ours and names a key id already loaded."""
        if self._ring is None:
            return False
        try:
            header, unverified = _unverified(token)
            issuer = unverified.get("iss")
        except jwt.PyJWTError:
            return True  # refused as malformed without any I/O either
        return issuer == self.settings.issuer and header.get("kid") in self._ring.public_keys

    # -- JWT ----------------------------------------------------------------------------------

    def _still_valid(self, known: Principal) -> Principal:
        """A remembered token's principal, unless the token has been revoked since."""
        if known.kind == "token" and known.credential_id in self.revocations.jtis:
            raise _unauthorized("the token has been revoked")
        return known

    def _token(self, token: str) -> Principal:
        """Verify `token` against the keys and revocations in memory."""
        generation = self.verified.generation
        known = self.verified.get(token)
        if known is not None:
            return self._still_valid(known)
        try:
            header, unverified = _unverified(token)
        except jwt.PyJWTError:
            raise _unauthorized("the bearer token is malformed") from None
        issuer = unverified.get("iss")
        jwks = self.settings.jwks
        try:
            if issuer == self.settings.issuer:
                claims = self._own_token(token, header)
                kind: Literal["token", "external"] = "token"
                role_claim, sites_claim = "role", "sites"
            elif jwks is not None and issuer == jwks.issuer:
                claims = self._external_token(token, header, jwks)
                kind, role_claim, sites_claim = "external", jwks.role_claim, jwks.sites_claim
            else:
                raise _unauthorized("the token's issuer is not trusted")
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise _unauthorized("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise _unauthorized("the token is meant for another audience") from None
        except jwt.InvalidIssuerError:
            raise _unauthorized("the token's issuer is not trusted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthorized(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise _unauthorized("the token's signature does not verify") from None
        except jwt.PyJWKClientError:
            raise _unauthorized("no key of the identity provider verifies the token") from None
        except jwt.PyJWTError:
            raise _unauthorized("the bearer token is invalid") from None
        self._check_lifetime(claims)
        try:
            role = parse_role(claims.get(role_claim))
            raw_sites = claims.get(sites_claim)
            if isinstance(raw_sites, str):
                raw_sites = [raw_sites]
            if not isinstance(raw_sites, list) or not all(isinstance(s, str) for s in raw_sites):
                raise ValueError("the sites claim must be a list of site ids")
            sites = parse_sites(raw_sites)
        except ValueError as exc:
            raise _unauthorized(f"the token's claims are unusable: {exc}") from None
        jti = str(claims.get("jti") or hashlib.sha256(token.encode()).hexdigest()[:32])
        if kind == "token" and jti in self.revocations.jtis:
            raise _unauthorized("the token has been revoked")
        principal = Principal(
            subject=str(claims.get("sub")),
            role=role,
            sites=sites,
            kind=kind,
            credential_id=jti,
            expires=datetime.fromtimestamp(int(claims["exp"]), UTC),
        )
        self.verified.put(token, principal, generation)
        return principal

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """Refuse a token that lives longer than `max_token_ttl_seconds` (from `iat`, or from
        now when it has none), whoever signed it: a key that leaked must not mint tokens that
        outlive every rotation."""
        limit = self.settings.max_token_ttl_seconds
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise _unauthorized("the token lacks the 'exp' claim")
        start = iat if isinstance(iat, int | float) and not isinstance(iat, bool) else time.time()
        if exp - start > limit:
            raise _unauthorized(f"the token's lifetime exceeds the maximum of {limit} s")

    def _own_token(self, token: str, header: Mapping[str, Any]) -> dict[str, Any]:
        # The algorithm is pinned: `none`, HMAC with the public key as secret and every other
        # algorithm are refused before any key is looked at.
        if header.get("alg") != ALGORITHM:
            raise _unauthorized(f"the token's algorithm is not accepted (expected {ALGORITHM})")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _unauthorized("the token has no key id (kid)")
        if kid in self.revocations.kids:
            raise _unauthorized("the token's signing key has been revoked")
        keys = self.verify_keys()
        if kid not in keys and time.monotonic() - self._ring_read >= self.revocations.refresh_s:
            # Perhaps a key created after the last read (rotation); unknown key ids read the
            # directory at most once per refresh period, however many arrive.
            self._ring = None
            keys = self.verify_keys()
        if kid not in keys:
            raise _unauthorized("the token was signed with an unknown key")
        claims: dict[str, Any] = jwt.decode(
            token,
            keys[kid],
            algorithms=[ALGORITHM],
            audience=self.settings.audience,
            issuer=self.settings.issuer,
            leeway=self.settings.leeway_seconds,
            options={"require": ["exp", "nbf", "iat", "iss", "aud", "sub", "jti"]},
        )
        if claims["iat"] > time.time() + self.settings.leeway_seconds:
            raise jwt.ImmatureSignatureError("issued in the future")
        return claims

    def _external_token(
        self, token: str, header: Mapping[str, Any], jwks: JwksSettings
    ) -> dict[str, Any]:
        if header.get("alg") not in jwks.algorithms:
            raise _unauthorized("the token's algorithm is not accepted for this issuer")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _unauthorized("the token has no key id (kid)")
        assert self._jwks is not None
        # The set as cached (fetched again when `cache_seconds` ran out); an unknown key id
        # fetches it before then at most once per `unknown_kid_refresh_seconds`, so tokens
        # with made-up key ids cannot make us hammer the provider.
        signing_key = self._jwks.match_kid(self._jwks.get_signing_keys(), kid)
        if signing_key is None:
            now = time.monotonic()
            if now - self._jwks_forced >= jwks.unknown_kid_refresh_seconds:
                self._jwks_forced = now
                signing_key = self._jwks.match_kid(self._jwks.get_signing_keys(refresh=True), kid)
        if signing_key is None:
            raise _unauthorized("no key of the identity provider verifies the token")
        claims: dict[str, Any] = jwt.decode(
            token,
            signing_key.key,
            algorithms=list(jwks.algorithms),
            audience=jwks.audience,
            issuer=jwks.issuer,
            leeway=self.settings.leeway_seconds,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
        return claims

    # -- API keys -----------------------------------------------------------------------------

    def _api_key(self, credential: str) -> Principal:
        match = API_KEY.fullmatch(credential)
        if match is None:
            raise _unauthorized("the API key is malformed")
        prefix, secret = match.groups()
        with self.pool().connection() as conn:
            row = conn.execute(
                "SELECT secret_hash, name, role, scopes, sites, expires_at, revoked_at, "
                "last_used_at FROM ops.api_keys WHERE prefix = %s",
                (prefix,),
            ).fetchone()
            if row is None or not hmac.compare_digest(row[0], hash_secret(secret)):
                raise _unauthorized("the API key is not valid")
            _, name, role, scopes, sites, expires_at, revoked_at, last_used = row
            now = datetime.now(UTC)
            if revoked_at is not None:
                raise _unauthorized("the API key has been revoked")
            if expires_at is not None and expires_at <= now:
                raise _unauthorized("the API key has expired")
            # Bounded write rate: last use is kept to the minute.
            if last_used is None or now - last_used > timedelta(minutes=1):
                conn.execute(
                    "UPDATE ops.api_keys SET last_used_at = now() WHERE prefix = %s", (prefix,)
                )
        return Principal(
            subject=f"apikey:{name}",
            role=parse_role(role),
            sites=parse_sites(sites),
            kind="api_key",
            credential_id=prefix,
            scopes=frozenset(scopes),
            expires=expires_at,
        )
