"""The auth part of `make bench`: the typical call with D3K2_AUTH=required, one fresh ES384 token per request.

wrk's Lua cannot sign ES384, so the tokens are minted here before the run: a pool of distinct tokens (each
its own jti, lifetime within the service's one-hour cap) written one a line for bench/post.lua, which sends
the next one with every request. The issuer's key is made at run time and its trust file written to the
bench's temp directory (no key is ever stored). The auth-off run sends tokens too (ignored by the service),
so wrk does the same work in both runs and the ratio measures only the service's checking: signature, claims
and the jti store.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "https://ehr.bench.test"
KID = "bench-es384"
PUBLIC_BASE_URL = "http://d3k2.bench.test"  # the audience: the service is told it, not the Host header
LIFETIME = 1800  # seconds; the service refuses exp - iat above an hour
TARGET = 0.8  # issue 24: auth on at ≥ 0.8 of the throughput with auth off


class Issuer:
    """A signing key made at run time, its trust file and the tokens it signs."""

    def __init__(self, directory: Path) -> None:
        self.private = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key()))
        self.trust = directory / "trust.json"
        trust = {"issuers": {ISSUER: {"jwks": {"keys": [{**jwk, "kid": KID, "alg": "ES384", "use": "sig"}]}}}}
        self.trust.write_text(json.dumps(trust))
        self.directory = directory

    def env(self) -> dict[str, str]:
        """What the auth-on d3k2 needs besides the auth-off one's environment."""
        return {
            "D3K2_AUTH": "required",
            "D3K2_TRUST_FILE": str(self.trust),
            "D3K2_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
        }

    def pool(self, name: str, count: int, path: str) -> Path:
        """``count`` distinct tokens for ``path``, one a line: their file."""
        now = int(time.time())
        header = {"kid": KID, "typ": "JWT"}
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": PUBLIC_BASE_URL + path,
            "iat": now,
            "exp": now + LIFETIME,
        }
        lines = [
            jwt.encode({**claims, "jti": uuid.uuid4().hex}, self.private, algorithm="ES384", headers=header)
            for _ in range(count)
        ]
        out = self.directory / f"tokens-{name}.txt"
        out.write_text("\n".join(lines) + "\n")
        return out


def pool_size(rps_off: float, seconds: float, connections: int) -> int:
    """Enough tokens for the auth-on run: the auth-off throughput (the higher one) for the whole run, with
    half again in reserve and the requests in flight at the end."""
    return int(rps_off * seconds * 1.5) + 100 * connections + 1000


def report_line(row: dict[str, Any]) -> str:
    share = row["ratio"]
    met = "met" if share >= TARGET else "NOT met"
    cpu_on, cpu_off = row["auth_on"]["worker_cpu_us"], row["auth_off"]["worker_cpu_us"]
    return (
        f"  auth: typical with D3K2_AUTH=required (a fresh ES384 token per request, {row['tokens']:,} minted)"
        f" at {share:.2f} of the same call with auth off (target ≥ {TARGET}: {met}); "
        f"worker CPU per request {cpu_on:.0f} vs {cpu_off:.0f} µs"
    )
