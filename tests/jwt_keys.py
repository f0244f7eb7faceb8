"""Signing keys made at test time (no private key is ever committed) and tokens signed with them."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SANDBOX_DIR = Path(__file__).resolve().parent / "data" / "sandbox"  # vendored sandbox recordings
SANDBOX_ISSUER = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
ISSUER = "https://ehr.test"
JKU = "https://ehr.test/.well-known/jwks.json"
BASE_URL = "http://127.0.0.1:8095"
NOW = 1_795_547_500  # 2026-11-24T19:11:40Z, inside the sandbox recording


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            jwt.algorithms.get_default_algorithms()[self.alg].to_jwk(self.public)
        )
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}

    @property
    def public(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        return self.private.public_key()

    def sign(
        self,
        claims: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        alg: str | None = None,
        **changes: Any,
    ) -> str:
        """A token with valid defaults at NOW for ``BASE_URL/cds-services``; ``changes`` override claims."""
        body = claims if claims is not None else default_claims(**changes)
        header = {"kid": self.kid, "typ": "JWT", **(headers or {})}
        return jwt.encode(body, self.private, algorithm=alg or self.alg, headers=header)


def default_claims(**changes: Any) -> dict[str, Any]:
    claims = {
        "iss": ISSUER,
        "aud": f"{BASE_URL}/cds-services",
        "iat": NOW - 10,
        "exp": NOW + 290,
        "jti": str(uuid.uuid4()),
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


@cache
def es384(kid: str = "es384-test") -> SigningKey:
    return SigningKey(kid, "ES384", ec.generate_private_key(ec.SECP384R1()))


@cache
def rs384(kid: str = "rs384-test", bits: int = 2048) -> SigningKey:
    return SigningKey(kid, "RS384", rsa.generate_private_key(public_exponent=65537, key_size=bits))


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [key.jwk() for key in keys]}


def sandbox_tokens() -> list[dict[str, Any]]:
    """Every recorded request that carried a JWT: token, decoded header and claims, path."""
    entries = json.loads((SANDBOX_DIR / "headers.json").read_text())
    return [
        {**entry["authorization"], "path": entry["path"]} for entry in entries if entry.get("authorization")
    ]


def write_trust(path: Path) -> Path:
    """A trust file at `path` naming the test issuer with the ES384 test key's JWKS."""
    path.write_text(json.dumps({"issuers": {ISSUER: {"jwks": jwks(es384())}}}))
    return path
