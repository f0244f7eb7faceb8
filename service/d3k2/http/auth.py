"""JWT verification of the EHR's ``Authorization: Bearer`` token (CDS Hooks 2.0 "Trusting CDS Clients").

Trust is configuration: a file maps each trusted ``iss`` to its keys (an inline JWKS, a JWKS file or a
JWKS URL) and to the ``jku`` URLs its tokens may name. Only ES384 and RS384 signatures are accepted.
Keys fetched over the network are cached with a TTL. Each ``jti`` is claimed in a ``JtiStore``
(d3k2.http.jti), so that every worker process rejects a replay.

Nothing here logs or echoes a token or its claims other than the issuer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import orjson
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Request

from d3k2.config import ConfigError, Settings
from d3k2.core.errors import Unauthorized
from d3k2.http.jti import JtiStore, PostgresJtiStore, open_jti_store

log = logging.getLogger("d3k2.http.auth")

SANDBOX_ISSUER = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
ALGORITHMS = ("ES384", "RS384")
CLOCK_SKEW = 60  # seconds of disagreement tolerated between the EHR's clock and ours
MAX_LIFETIME = 3600  # exp - iat; CDS Hooks clients use 5 minutes
MAX_JTI_LENGTH = 256
MIN_RSA_BITS = 2048
JWKS_MAX_BYTES = 256 * 1024
JWKS_TIMEOUT = (2.0, 3.0)  # connect, read
RETRY_FAILED_FETCH = 30.0  # an unreachable JWKS URL is not asked again sooner
REFRESH_ON_UNKNOWN_KID = 60.0  # a rotated key is looked for at most this often
REALM = "d3k2"

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
Clock = Callable[[], float]
JwksFetcher = Callable[[str], Mapping[str, Any]]


class MissingToken(Unauthorized):
    """No Authorization header: RFC 6750 asks for a bare challenge, without an error code."""


class KeysUnavailable(Unauthorized):
    """The issuer is trusted but its keys could not be fetched: tolerated when D3K2_AUTH=optional."""


def www_authenticate(exc: Unauthorized) -> str:
    if isinstance(exc, MissingToken):
        return f'Bearer realm="{REALM}"'
    description = "".join(ch for ch in exc.detail if " " <= ch <= "~" and ch not in '"\\')
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="{description}"'


# ---------------------------------------------------------------- trust configuration


@dataclass(frozen=True)
class Key:
    kid: str
    key: PublicKey
    alg: str | None  # the JWK's own "alg", when it declares one


@dataclass(frozen=True)
class Issuer:
    iss: str
    keys: Mapping[str, Key] = field(default_factory=dict)  # kid → key, from inline JWKS or a JWKS file
    jwks_url: str | None = None
    jku_allow: frozenset[str] = frozenset()


def parse_jwks(data: Any, where: str) -> dict[str, Key]:
    """The usable signing keys of a JWKS document, by kid; private parts are dropped."""
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{where}: a JWKS must be an object with a 'keys' list")
    keys: dict[str, Key] = {}
    for position, jwk in enumerate(data["keys"]):
        if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError(f"{where}: key {position} has no kid")
        try:
            parsed = jwt.PyJWK.from_dict(dict(jwk)).key
        except jwt.PyJWTError as exc:
            raise ValueError(f"{where}: key {kid!r} cannot be read ({exc})") from exc
        if isinstance(parsed, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            parsed = parsed.public_key()
        if not isinstance(parsed, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            continue
        alg = jwk.get("alg")
        keys[kid] = Key(kid, parsed, alg if isinstance(alg, str) else None)
    return keys


def _jwks_url(value: Any, where: str) -> str:
    """https, or http on loopback only (a local test server): keys must not travel in the clear."""
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a URL string")
    parts = urlsplit(value)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ConfigError(f"{where} must be an https URL (http only on loopback), got {value!r}")
    return value


_ISSUER_FIELDS = {"jwks", "jwks_file", "jwks_url", "jku_allow"}


def parse_trust(data: Any, base_dir: Path, source: str = "trust file") -> dict[str, Issuer]:
    """``{"issuers": {iss: {jwks | jwks_file | jwks_url, jku_allow}}}`` → issuers by ``iss``."""
    issuers_raw = data.get("issuers") if isinstance(data, Mapping) else None
    if not isinstance(issuers_raw, Mapping):
        raise ConfigError(f"{source}: an 'issuers' table mapping iss to its keys is required")
    issuers: dict[str, Issuer] = {}
    for iss, spec in issuers_raw.items():
        where = f"{source}: issuer {iss!r}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a table")
        unknown = set(spec) - _ISSUER_FIELDS
        if unknown:
            raise ConfigError(
                f"{where} has unknown fields {sorted(unknown)} (known: {sorted(_ISSUER_FIELDS)})"
            )
        keys: dict[str, Key] = {}
        try:
            if "jwks" in spec:
                keys.update(parse_jwks(spec["jwks"], f"{where} jwks"))
            if "jwks_file" in spec:
                path = base_dir / str(spec["jwks_file"])
                keys.update(parse_jwks(orjson.loads(path.read_bytes()), f"{where} jwks_file {path}"))
        except (OSError, orjson.JSONDecodeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        jwks_url = _jwks_url(spec["jwks_url"], f"{where} jwks_url") if "jwks_url" in spec else None
        allow_raw = spec.get("jku_allow", [])
        if not isinstance(allow_raw, list):
            raise ConfigError(f"{where} jku_allow must be a list of URLs")
        jku_allow = frozenset(_jwks_url(url, f"{where} jku_allow") for url in allow_raw)
        if not keys and jwks_url is None and not jku_allow:
            raise ConfigError(f"{where} has no keys: give jwks, jwks_file, jwks_url or jku_allow")
        issuers[str(iss)] = Issuer(str(iss), keys, jwks_url, jku_allow)
    return issuers


def load_trust(path: Path) -> dict[str, Issuer]:
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else orjson.loads(raw)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"D3K2_TRUST_FILE {path} cannot be read: {exc}") from exc
    return parse_trust(data, path.parent, f"trust file {path}")


def trusted_issuers(settings: Settings) -> dict[str, Issuer]:
    """The trust file's issuers; the dev profile adds the public sandbox (keys from its jku)."""
    issuers = load_trust(settings.trust_file) if settings.trust_file is not None else {}
    if settings.env == "dev":
        issuers.setdefault(SANDBOX_ISSUER, Issuer(SANDBOX_ISSUER, jku_allow=frozenset({SANDBOX_JKU})))
    return issuers


# ---------------------------------------------------------------- fetched keys


def fetch_jwks(url: str) -> Mapping[str, Any]:
    """GET a JWKS: no redirects, no proxy or netrc from the environment, bounded in time and size."""
    with requests.Session() as session:
        session.trust_env = False
        with session.get(
            url,
            timeout=JWKS_TIMEOUT,
            allow_redirects=False,
            stream=True,
            headers={"Accept": "application/json"},
        ) as response:
            if response.status_code != 200:
                raise OSError(f"HTTP {response.status_code}")
            body = b""
            for chunk in response.iter_content(chunk_size=16 * 1024):
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise OSError(f"larger than {JWKS_MAX_BYTES} bytes")
    data = orjson.loads(body)
    if not isinstance(data, Mapping):
        raise ValueError("not a JSON object")
    return data


@dataclass
class _Entry:
    keys: dict[str, Key] | None
    fetched_at: float
    failed_at: float | None = None


class JwksCache:
    """Keys by JWKS URL, kept ``ttl`` seconds. Only URLs from the trust configuration ever reach it."""

    def __init__(self, ttl: float, fetch: JwksFetcher = fetch_jwks) -> None:
        self._ttl = ttl
        self._fetch = fetch
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def keys(self, url: str, now: float, *, unknown_kid: bool = False) -> dict[str, Key]:
        with self._lock:
            entry = self._entries.get(url)
        if entry is not None and not self._due(entry, now, unknown_kid):
            if entry.keys is None:
                raise KeysUnavailable("the signing keys of the issuer could not be fetched")
            return entry.keys
        try:
            keys = parse_jwks(self._fetch(url), url)
        except (OSError, requests.RequestException, ValueError) as exc:
            # The URL comes from configuration; the reason is the exception's class, never a response body.
            log.warning("jwks fetch failed url=%s reason=%s", url, type(exc).__name__)
            stale = entry.keys if entry is not None else None
            with self._lock:
                self._entries[url] = _Entry(stale, entry.fetched_at if entry else now, failed_at=now)
            if stale is None:
                raise KeysUnavailable("the signing keys of the issuer could not be fetched") from None
            return stale
        with self._lock:
            self._entries[url] = _Entry(keys, now)
        log.info("jwks fetched url=%s keys=%d", url, len(keys))
        return keys

    def _due(self, entry: _Entry, now: float, unknown_kid: bool) -> bool:
        if entry.failed_at is not None and now - entry.failed_at < RETRY_FAILED_FETCH:
            return False
        age = now - entry.fetched_at
        if unknown_kid:
            return age >= REFRESH_ON_UNKNOWN_KID
        return entry.keys is None or age >= self._ttl


# ---------------------------------------------------------------- verification


def _number(claims: Mapping[str, Any], name: str) -> float:
    """A time claim as seconds. NaN and infinities (JSON parsers admit them) compare false with everything,
    so they would pass every time check, and a 400-digit integer does not fit a float: both refused."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthorized(f"claim {name} must be a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise Unauthorized(f"claim {name} must be a finite number of seconds")
    return seconds


class Verifier:
    def __init__(
        self, issuers: Mapping[str, Issuer], cache: JwksCache, replay: JtiStore | PostgresJtiStore
    ) -> None:
        self._issuers = issuers
        self._cache = cache
        self._replay = replay

    def verify(self, token: str, audience: str, now: float) -> dict[str, Any]:
        """The token's claims if it is valid for ``audience`` at ``now``; otherwise Unauthorized."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("the bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthorized(f"the token algorithm is not accepted (only {', '.join(ALGORITHMS)})")
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise Unauthorized("the token issuer is not trusted")
        key = self._key(issuer, header, alg, now)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer.iss,
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["iss", "aud", "exp", "iat", "jti"],
                },
            )
        except jwt.InvalidSignatureError:
            raise Unauthorized("the token signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(
                f"the token aud is not the URL called ({audience}); behind a proxy set D3K2_PUBLIC_BASE_URL"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the token has no {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the token is invalid ({type(exc).__name__})") from None
        self._check_times(claims, now)
        jti = claims["jti"]
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH:
            raise Unauthorized(f"claim jti must be a string of 1 to {MAX_JTI_LENGTH} characters")
        if not self._replay.claim(issuer.iss, jti, _number(claims, "exp") + CLOCK_SKEW, now):
            raise Unauthorized("the token was already used (jti replayed)")
        return claims

    def _key(self, issuer: Issuer, header: Mapping[str, Any], alg: str, now: float) -> Key:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("the token header has no kid")
        jku = header.get("jku")
        if jku is not None and (not isinstance(jku, str) or jku not in issuer.jku_allow):
            raise Unauthorized("the token jku is not on the issuer's allow-list")
        key = issuer.keys.get(kid)
        url = jku or issuer.jwks_url
        if key is None and url is not None:
            key = self._cache.keys(url, now).get(kid) or self._cache.keys(url, now, unknown_kid=True).get(kid)
        if key is None:
            raise Unauthorized("no key of the issuer has the token's kid")
        expected = ec.EllipticCurvePublicKey if alg == "ES384" else rsa.RSAPublicKey
        if (
            not isinstance(key.key, expected)
            or (key.alg is not None and key.alg != alg)
            or (isinstance(key.key, ec.EllipticCurvePublicKey) and key.key.curve.name != "secp384r1")
            or (isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS)
        ):
            raise Unauthorized("the token algorithm does not fit the key named by its kid")
        return key

    @staticmethod
    def _check_times(claims: Mapping[str, Any], now: float) -> None:
        exp = _number(claims, "exp")
        iat = _number(claims, "iat")
        if exp <= now - CLOCK_SKEW:
            raise Unauthorized("the token has expired")
        if iat > now + CLOCK_SKEW:
            raise Unauthorized("the token iat is in the future")
        if exp - iat > MAX_LIFETIME:
            raise Unauthorized(f"the token lifetime (exp - iat) exceeds {MAX_LIFETIME} s")
        if "nbf" in claims and _number(claims, "nbf") > now + CLOCK_SKEW:
            raise Unauthorized("the token is not valid yet (nbf)")


# ---------------------------------------------------------------- the HTTP edge


def protected(path: str) -> bool:
    return path == "/cds-services" or path.startswith("/cds-services/")


class Authenticator:
    """Applies D3K2_AUTH to each request. ``clock`` is wall-clock seconds; tests replace it."""

    def __init__(
        self, mode: str, verifier: Verifier, public_base_url: str | None, clock: Clock = time.time
    ) -> None:
        self.mode = mode
        self.verifier = verifier
        self.public_base_url = public_base_url
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, fetch: JwksFetcher = fetch_jwks) -> Authenticator:
        mode = settings.auth_mode
        issuers = trusted_issuers(settings) if mode != "off" else {}
        if mode == "required" and not issuers:
            raise ConfigError("D3K2_AUTH=required but no issuer is trusted: set D3K2_TRUST_FILE")
        verifier = Verifier(issuers, JwksCache(settings.jwks_ttl, fetch), open_jti_store(settings))
        return cls(mode, verifier, settings.public_base_url)

    def audience(self, req: Request) -> str:
        """The external URL of the endpoint called, which the EHR puts in ``aud``."""
        if self.public_base_url:
            return self.public_base_url + req.path
        return req.base_url

    def check(self, req: Request) -> dict[str, Any] | None:
        """The verified claims, or None when no verification applies; Unauthorized when refused."""
        if self.mode == "off" or req.method == "OPTIONS" or not protected(req.path):
            return None
        header = req.headers.get("Authorization", "")
        if not header:
            if self.mode == "required":
                raise MissingToken("a bearer token (JWT) is required in the Authorization header")
            log.warning("request without a bearer token accepted (D3K2_AUTH=optional)")
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <JWT>'")
        try:
            claims = self.verifier.verify(token.strip(), self.audience(req), self.clock())
        except KeysUnavailable as exc:
            if self.mode == "required":
                log.warning("bearer token rejected: %s", exc.detail)
                raise
            log.warning("bearer token not verified, accepted (D3K2_AUTH=optional): %s", exc.detail)
            return None
        except Unauthorized as exc:
            log.warning("bearer token rejected: %s", exc.detail)
            raise
        log.debug("bearer token accepted iss=%s", claims["iss"])
        return claims
