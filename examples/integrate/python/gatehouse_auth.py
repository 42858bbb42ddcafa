"""FastAPI dependencies that accept gatehouse access tokens.

Two ways to check a token, as two dependencies:

* ``device``: offline. The token's signature is checked against the server's JWKS
  (fetched once, kept as long as its Cache-Control allows, fetched again when a token
  names a key the cached set lacks), then ``typ``, ``iss``, ``aud`` and the times. No
  call to gatehouse per request, but a revocation is not seen before the token expires.
* ``live_device``: the same checks, then gatehouse's introspection endpoint (RFC 7662),
  which also knows about revoked tokens, families, devices and keys.

Both answer 401 with ``WWW-Authenticate: Bearer ...`` when the token is missing or not
valid, and 503 when gatehouse cannot be asked (never 200: they fail closed).

Configuration, from the environment (not ``GATEHOUSE_*``: gatehouse itself refuses
unknown variables with that prefix, and the two may share a shell):

* ``AUTH_ISSUER``: the server's issuer, exactly as in its tokens' ``iss``
  (``tokens.issuer``, for example ``https://auth.example.com``). The JWKS and
  introspection URLs are derived from it.
* ``AUTH_AUDIENCE``: the ``aud`` this app expects (``tokens.audience``; gatehouse's
  default is the issuer, used here too when unset).
* ``AUTH_CA_FILE``: a PEM file with the only certificate to trust for gatehouse (its
  self-signed certificate). Unset: the system's CAs, as for any public server.
* ``AUTH_CLIENT_ID``, ``AUTH_CLIENT_SECRET``: the API client for introspection
  (``gatehouse clients create --name api``). Needed by ``live_device`` only.
* ``AUTH_LEEWAY_SECONDS``: clock skew tolerated on ``exp``, ``nbf`` and ``iat``
  (default 30, as gatehouse's own ``tokens.leeway``).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jwt import PyJWKClient, PyJWKClientConnectionError, PyJWKClientError

log = logging.getLogger("gatehouse_auth")

# gatehouse signs with Ed25519 (EdDSA) or P-256 (ES256). Nothing else is ever accepted:
# not "none", not HS256 (a public key must never be usable as an HMAC secret).
ALLOWED_ALGORITHMS = ("EdDSA", "ES256")
ACCESS_TOKEN_TYP = "at+jwt"
# gatehouse refuses longer tokens itself; so does this app, before any parsing.
MAX_TOKEN_BYTES = 8 * 1024
# Every claim a gatehouse access token carries.
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "nbf", "iat", "jti", "sid"]


@dataclass(frozen=True)
class Settings:
    issuer: str
    audience: str
    ca_file: str | None
    client_id: str | None
    client_secret: str | None
    leeway: float

    @classmethod
    def from_env(cls) -> Settings:
        issuer = os.environ["AUTH_ISSUER"].rstrip("/")
        return cls(
            issuer=issuer,
            audience=os.environ.get("AUTH_AUDIENCE") or issuer,
            ca_file=os.environ.get("AUTH_CA_FILE") or None,
            client_id=os.environ.get("AUTH_CLIENT_ID") or None,
            client_secret=os.environ.get("AUTH_CLIENT_SECRET") or None,
            leeway=float(os.environ.get("AUTH_LEEWAY_SECONDS", "30")),
        )


@dataclass(frozen=True)
class Device:
    """Who is calling: a device that an operator paired."""

    id: str  # `sub`: the device id (dev_...)
    token_id: str  # `jti`
    family: str  # `sid`: the refresh-token family (one per pairing)
    expires_at: int  # `exp`, Unix seconds


class InvalidToken(Exception):
    """The token must be refused (401). `reason` is for the log, never the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unavailable(Exception):
    """gatehouse could not be asked (503)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _max_age(cache_control: str | None) -> int | None:
    match = re.search(r"(?:^|[,\s])max-age=(\d+)", cache_control or "")
    return int(match.group(1)) if match else None


class CachingJWKClient(PyJWKClient):
    """PyJWKClient that keeps the key set as long as the server's Cache-Control says.

    PyJWKClient already fetches the set again when a token names an unknown `kid` (a
    rotation), at most once per `cooldown_duration`.
    """

    def fetch_data(self) -> Any:
        request = urllib.request.Request(
            self.uri, headers={"Accept": "application/jwk-set+json, application/json"}
        )
        opener = urllib.request.build_opener(
            _NoRedirect(), urllib.request.HTTPSHandler(context=self.ssl_context)
        )
        try:
            with opener.open(request, timeout=self.timeout) as response:
                max_age = _max_age(response.headers.get("Cache-Control"))
                data = json.load(response)
        except (urllib.error.URLError, TimeoutError, http.client.HTTPException) as err:
            raise PyJWKClientConnectionError(f"fetching the JWKS failed: {err}") from err
        if self.jwk_set_cache is not None and max_age is not None:
            # Bounded: at least a second, at most a day.
            self.jwk_set_cache.lifespan = min(max(max_age, 1), 86400)
        return data


class Verifier:
    def __init__(self, settings: Settings):
        self.settings = settings
        # With a CA file: that certificate and nothing else. Without: the system's CAs.
        self.tls = ssl.create_default_context(cafile=settings.ca_file)
        self.jwks = CachingJWKClient(
            f"{settings.issuer}/.well-known/jwks.json",
            ssl_context=self.tls,
            timeout=5,
            cooldown_duration=10,
        )

    def verify(self, token: str) -> Device:
        """Offline verification (RFC 8725): typ, kid, algorithm, signature, claims."""
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise InvalidToken("malformed") from err
        if header.get("typ") != ACCESS_TOKEN_TYP:
            raise InvalidToken("wrong_typ")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALLOWED_ALGORITHMS:
            raise InvalidToken("algorithm")
        if not isinstance(kid, str):
            raise InvalidToken("malformed")
        try:
            key = self.jwks.get_signing_key(kid)
        except PyJWKClientConnectionError as err:
            raise Unavailable(str(err)) from err
        except PyJWKClientError as err:
            raise InvalidToken("unknown_key") from err
        # The algorithm is the key's own, never the token's choice.
        if key.algorithm_name != alg:
            raise InvalidToken("algorithm")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                issuer=self.settings.issuer,
                audience=self.settings.audience,
                leeway=self.settings.leeway,
                options={"require": REQUIRED_CLAIMS, "strict_aud": True},
            )
        except jwt.ExpiredSignatureError as err:
            raise InvalidToken("expired") from err
        except jwt.InvalidAudienceError as err:
            raise InvalidToken("wrong_audience") from err
        except jwt.InvalidIssuerError as err:
            raise InvalidToken("wrong_issuer") from err
        except jwt.ImmatureSignatureError as err:
            raise InvalidToken("not_yet_valid") from err
        except jwt.InvalidSignatureError as err:
            raise InvalidToken("bad_signature") from err
        except jwt.PyJWTError as err:
            raise InvalidToken("malformed") from err
        return Device(
            id=claims["sub"],
            token_id=claims["jti"],
            family=claims["sid"],
            expires_at=claims["exp"],
        )

    def introspect(self, token: str) -> dict[str, Any]:
        """POST /v1/introspect with the API client's HTTP Basic credentials."""
        if not (self.settings.client_id and self.settings.client_secret):
            raise Unavailable("AUTH_CLIENT_ID and AUTH_CLIENT_SECRET are not set")
        basic = f"{self.settings.client_id}:{self.settings.client_secret}"
        request = urllib.request.Request(
            f"{self.settings.issuer}/v1/introspect",
            data=urllib.parse.urlencode({"token": token}).encode(),
            method="POST",
            headers={
                "Authorization": "Basic " + base64.b64encode(basic.encode()).decode(),
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
        )
        opener = urllib.request.build_opener(
            _NoRedirect(), urllib.request.HTTPSHandler(context=self.tls)
        )
        try:
            with opener.open(request, timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            # 401: this app's client credentials are wrong or revoked; 429: its
            # introspection budget is spent. Neither says anything about the token.
            raise Unavailable(f"introspection answered {err.code}") from err
        except (urllib.error.URLError, TimeoutError, http.client.HTTPException) as err:
            raise Unavailable(f"introspection failed: {err}") from err

    def verify_live(self, token: str) -> Device:
        device = self.verify(token)  # refuses most bad tokens without a request
        answer = self.introspect(token)
        if answer.get("active") is not True or answer.get("sub") != device.id:
            raise InvalidToken("inactive")
        return device


@lru_cache(maxsize=1)
def get_verifier() -> Verifier:
    return Verifier(Settings.from_env())


_bearer = HTTPBearer(auto_error=False)


def _refuse(reason: str, err: InvalidToken | None = None) -> HTTPException:
    if err is None:
        # No token at all (RFC 6750 section 3.1: no error code).
        challenge = 'Bearer realm="api"'
    else:
        log.info("gatehouse token refused: reason=%s", err.reason)
        challenge = 'Bearer realm="api", error="invalid_token"'
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=reason,
        headers={"WWW-Authenticate": challenge},
    )


def _unavailable(err: Unavailable) -> HTTPException:
    log.error("gatehouse unavailable: %s", err)
    return HTTPException(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        detail="the token cannot be checked now",
        headers={"Retry-After": "5"},
    )


# Sync dependencies: FastAPI runs them in its thread pool, so the blocking JWKS fetch
# and introspection calls never stall the event loop.
def device(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    verifier: Verifier = Depends(get_verifier),
) -> Device:
    """The calling device, from its access token, checked offline."""
    if credentials is None:
        raise _refuse("an access token is required")
    try:
        return verifier.verify(credentials.credentials)
    except InvalidToken as err:
        raise _refuse("the access token is invalid or expired", err) from err
    except Unavailable as err:
        raise _unavailable(err) from err


def live_device(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    verifier: Verifier = Depends(get_verifier),
) -> Device:
    """The calling device, checked offline and then by introspection (sees revocations)."""
    if credentials is None:
        raise _refuse("an access token is required")
    try:
        return verifier.verify_live(credentials.credentials)
    except InvalidToken as err:
        raise _refuse("the access token is invalid, expired or revoked", err) from err
    except Unavailable as err:
        raise _unavailable(err) from err
