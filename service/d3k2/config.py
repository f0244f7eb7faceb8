"""Configuration: one typed object, read once from ``D3K2_*`` environment variables in create_app()."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from d3k2.core.errors import D3K2Error


class ConfigError(D3K2Error):
    code = "configuration-invalid"


def default_cards_dir() -> Path:
    """cards/ of the checkout (editable install) or the copy packed into the wheel."""
    here = Path(__file__).resolve().parent
    packed = here / "_cards"
    if packed.is_dir():
        return packed
    return here.parent.parent / "cards"


# Origins (scheme://host:port) as fnmatch patterns; the dev default admits loopback only.
_LOOPBACK = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")


@dataclass(frozen=True)
class Settings:
    env: str = "dev"
    host: str = "127.0.0.1"
    port: int = 8080
    profile: str = "seed"
    cards_dir: Path = field(default_factory=default_cards_dir)
    data_dir: Path = Path("data")
    max_body_bytes: int = 5 * 1024 * 1024
    fhir_timeout: float = 2.0
    fhir_budget: float = 3.0
    fhir_max_pages: int = 5
    fhir_workers: int = 8
    fhir_max_bytes: int = 20 * 1024 * 1024
    fhir_allowed: tuple[str, ...] = _LOOPBACK
    log_level: str = "INFO"
    database_url: str | None = None  # None: SQLite file under data_dir
    auth: str | None = None  # off | optional | required; None: required in production, else optional
    trust_file: Path | None = None
    public_base_url: str | None = None  # external scheme://host[:port][/prefix] when behind a proxy
    # Production without public_base_url would take the JWT audience from the client's Host header, which
    # anyone can set: allowed only when the operator says that every Host reaching d3k2 is trusted.
    trust_host_header: bool = False
    jti_db: Path | None = None  # None: <data_dir>/jti.sqlite3
    jwks_ttl: float = 300.0
    max_json_depth: int = 64
    max_prefetch_entries: int = 20_000
    preview: bool | None = None  # the card preview page; None: on in dev only
    # Keys the card uuids (d3k2.core.cards.card_uuid); None: a key kept in the feedback database.
    card_key: str | None = field(default=None, repr=False)
    # The "Why this card?" SMART app (d3k2.http.smart): its base URL as the EHR reaches it (the launch URL
    # is <base>/launch), an explicit off switch, the client_id registered with the EHR's authorization
    # server, the FHIR server of a standalone launch, and the secret its session cookies are sealed with.
    smart_app_url: str | None = None
    smart: bool | None = None  # None: on when smart_app_url is set
    smart_client_id: str = "d3k2"
    smart_iss: str | None = None
    smart_secret: str | None = None  # None: a random key per process (one process only)
    smart_frame_ancestors: str | None = (
        None  # CSP frame-ancestors of the app (the EHR's origins); None: 'none'
    )

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def auth_mode(self) -> str:
        if self.auth is not None:
            return self.auth
        return "required" if self.env == "production" else "optional"

    @property
    def preview_enabled(self) -> bool:
        return self.preview if self.preview is not None else self.env == "dev"

    @property
    def smart_enabled(self) -> bool:
        return self.smart_app_url is not None and self.smart is not False

    @property
    def smart_launch_url(self) -> str | None:
        """What cards link to (type "smart"); None when the app is off."""
        return f"{self.smart_app_url}/launch" if self.smart_enabled else None

    @property
    def jti_path(self) -> Path:
        return self.jti_db if self.jti_db is not None else self.data_dir / "jti.sqlite3"

    @property
    def database(self) -> str:
        """SQLAlchemy URL of the feedback store: D3K2_DATABASE_URL, else an SQLite file under data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'd3k2.sqlite3').resolve()}"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from ``D3K2_*`` variables; unknown values fail with the variable named."""
    env = os.environ if env is None else env
    base = Settings()
    allowed_raw = env.get("D3K2_FHIR_ALLOWED")
    environment = env.get("D3K2_ENV", base.env)
    if environment not in ("dev", "production", "test"):
        raise ConfigError(f"D3K2_ENV must be dev, production or test, got {environment!r}")
    if allowed_raw is not None:
        allowed = tuple(part.strip().rstrip("/") for part in allowed_raw.split(",") if part.strip())
    else:
        # Production fetches from no FHIR server until told which: loopback ports of the host are not an
        # EHR, and a request naming one would receive the bearer token.
        allowed = () if environment == "production" else base.fhir_allowed
    settings = Settings(
        env=environment,
        host=env.get("D3K2_HOST", base.host),
        port=_int(env, "D3K2_PORT", base.port),
        profile=env.get("D3K2_PROFILE", base.profile),
        cards_dir=Path(env["D3K2_CARDS_DIR"]) if env.get("D3K2_CARDS_DIR") else base.cards_dir,
        data_dir=Path(env.get("D3K2_DATA_DIR", str(base.data_dir))),
        max_body_bytes=_int(env, "D3K2_MAX_BODY_BYTES", base.max_body_bytes),
        fhir_timeout=_float(env, "D3K2_FHIR_TIMEOUT", base.fhir_timeout),
        fhir_budget=_float(env, "D3K2_FHIR_BUDGET", base.fhir_budget),
        fhir_max_pages=_int(env, "D3K2_FHIR_MAX_PAGES", base.fhir_max_pages),
        fhir_workers=max(1, _int(env, "D3K2_FHIR_WORKERS", base.fhir_workers)),
        fhir_max_bytes=_int(env, "D3K2_FHIR_MAX_BYTES", base.fhir_max_bytes),
        fhir_allowed=allowed,
        log_level=env.get("D3K2_LOG_LEVEL", base.log_level).upper(),
        database_url=env.get("D3K2_DATABASE_URL") or None,
        auth=_auth_mode(env),
        trust_file=Path(env["D3K2_TRUST_FILE"]) if env.get("D3K2_TRUST_FILE") else None,
        public_base_url=_public_base_url(env),
        jti_db=Path(env["D3K2_JTI_DB"]) if env.get("D3K2_JTI_DB") else None,
        jwks_ttl=_float(env, "D3K2_JWKS_TTL", base.jwks_ttl),
        max_json_depth=max(1, _int(env, "D3K2_MAX_JSON_DEPTH", base.max_json_depth)),
        max_prefetch_entries=_int(env, "D3K2_MAX_PREFETCH_ENTRIES", base.max_prefetch_entries),
        preview=_preview(env),
        trust_host_header=_flag(env, "D3K2_TRUST_HOST_HEADER"),
        card_key=_card_key(env),
        smart_app_url=_url(env, "D3K2_SMART_APP_URL"),
        smart=_on_off(env, "D3K2_SMART"),
        smart_client_id=env.get("D3K2_SMART_CLIENT_ID") or base.smart_client_id,
        smart_iss=_url(env, "D3K2_SMART_ISS"),
        smart_secret=env.get("D3K2_SMART_SECRET") or None,
        smart_frame_ancestors=_frame_ancestors(env),
    )
    check_audience(settings)
    check_smart(settings)
    return settings


def check_audience(settings: Settings) -> None:
    """Production refuses to start when the JWT audience would come from the Host header."""
    if settings.env == "production" and not settings.public_base_url and not settings.trust_host_header:
        raise ConfigError(
            "D3K2_ENV=production requires D3K2_PUBLIC_BASE_URL (the external URL the EHR calls, which JWTs "
            "name in aud); only on a single host whose every client is trusted, set D3K2_TRUST_HOST_HEADER=1 "
            "to take it from the Host header instead"
        )


CARD_KEY_MIN = 32


def _card_key(env: Mapping[str, str]) -> str | None:
    raw = env.get("D3K2_CARD_KEY") or None
    if raw is not None and len(raw) < CARD_KEY_MIN:
        # Never quoted: it is a secret.
        raise ConfigError(
            f"D3K2_CARD_KEY must be at least {CARD_KEY_MIN} characters (e.g. openssl rand -hex 32)"
        )
    return raw


def check_smart(settings: Settings) -> None:
    """The SMART app needs its URL when switched on, and in production a secret shared by every worker."""
    if settings.smart is True and settings.smart_app_url is None:
        raise ConfigError("D3K2_SMART=on requires D3K2_SMART_APP_URL (the app's base URL, e.g. .../smart)")
    if settings.smart_enabled and settings.env == "production" and not settings.smart_secret:
        raise ConfigError(
            "the SMART app in production requires D3K2_SMART_SECRET (the same in every worker: it seals the "
            "app's session cookies)"
        )
    # Whoever guesses it can forge a launch cookie, and with it the token endpoint d3k2 posts to.
    if settings.smart_secret is not None and len(settings.smart_secret) < CARD_KEY_MIN:
        # Never quoted: it is a secret.
        raise ConfigError(
            f"D3K2_SMART_SECRET must be at least {CARD_KEY_MIN} characters (e.g. openssl rand -hex 32)"
        )


def _url(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    if not raw.startswith(("http://", "https://")) or "?" in raw or "#" in raw:
        raise ConfigError(f"{name} must be an http(s) URL without query, got {raw!r}")
    return raw.rstrip("/")


def _frame_ancestors(env: Mapping[str, str]) -> str | None:
    raw = " ".join(env.get("D3K2_SMART_FRAME_ANCESTORS", "").replace(",", " ").split())
    if not raw:
        return None
    if any(
        not part.startswith(("https://", "http://")) or ";" in part or "'" in part for part in raw.split()
    ):
        raise ConfigError(f"D3K2_SMART_FRAME_ANCESTORS must list http(s) origins, got {raw!r}")
    return raw


def _on_off(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    if raw not in ("on", "off"):
        raise ConfigError(f"{name} must be on or off, got {raw!r}")
    return raw == "on"


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "")
    if raw not in ("", "0", "1"):
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _preview(env: Mapping[str, str]) -> bool | None:
    raw = env.get("D3K2_PREVIEW")
    if raw is None or raw == "":
        return None
    if raw not in ("on", "off"):
        raise ConfigError(f"D3K2_PREVIEW must be on or off, got {raw!r}")
    return raw == "on"


def _auth_mode(env: Mapping[str, str]) -> str | None:
    raw = env.get("D3K2_AUTH")
    if raw is None or raw == "":
        return None
    if raw not in ("off", "optional", "required"):
        raise ConfigError(f"D3K2_AUTH must be off, optional or required, got {raw!r}")
    return raw


def _public_base_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("D3K2_PUBLIC_BASE_URL")
    if raw is None or raw == "":
        return None
    if not raw.startswith(("http://", "https://")) or "?" in raw or "#" in raw:
        raise ConfigError(f"D3K2_PUBLIC_BASE_URL must be an http(s) URL without query, got {raw!r}")
    return raw.rstrip("/")
