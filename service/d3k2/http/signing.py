"""The bearer token a CDS client signs for each call, for ``d3k2 replay --url`` against a d3k2 that checks
tokens (its trust file must hold the public key)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from d3k2.config import ConfigError
from d3k2.http.auth import MIN_RSA_BITS, Clock


@dataclass(frozen=True)
class TokenSigner:
    """Signs the bearer token a CDS client sends with each call, as the EHR does: ``iss``, ``sub``, ``aud``
    (the URL called), ``iat``, ``exp`` five minutes later and a fresh ``jti``, with ``kid`` in the header.
    For ``d3k2 replay --url`` against a d3k2 that checks tokens; its trust file must hold the public key."""

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    alg: str
    iss: str
    kid: str
    lifetime: int = 300
    clock: Clock = time.time

    @classmethod
    def from_pem(cls, path: Path, iss: str, kid: str) -> TokenSigner:
        """A signer with the unencrypted PEM private key at ``path``: a P-384 key signs ES384, an RSA key
        of at least 2048 bits RS384 (the only algorithms d3k2 accepts)."""
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            raise ConfigError(f"cannot read the signing key {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{path} is not an unencrypted PEM private key ({detail})") from None
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
            return cls(key, "ES384", iss, kid)
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= MIN_RSA_BITS:
            return cls(key, "RS384", iss, kid)
        raise ConfigError(
            f"{path}: the key must be EC P-384 (ES384) or RSA of at least {MIN_RSA_BITS} bits (RS384)"
        )

    def authorization(self, audience: str) -> str:
        """The ``Authorization`` header value for one call to ``audience``."""
        now = int(self.clock())
        claims = {
            "iss": self.iss,
            "sub": self.iss,
            "aud": audience,
            "iat": now,
            "exp": now + self.lifetime,
            "jti": str(uuid.uuid4()),
        }
        token = jwt.encode(claims, self.key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"})
        return f"Bearer {token}"
