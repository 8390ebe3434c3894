"""API key -> tenant.

Keys live in the policy file only as ``sha256:<hex>``; the gateway never holds a plaintext key
beyond the request that carried it. The presented key is hashed and looked up by digest; the
final comparison uses ``hmac.compare_digest`` so no byte-by-byte timing difference exists even
if a future change swaps the dict for something else.

Clients send the key as ``Authorization: Bearer <key>`` (OpenAI SDKs) or ``x-api-key: <key>``
(Anthropic SDKs); either works on every route.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import GatewayConfig, Priority
from gateway.errors import GatewayError


class AuthenticationFailed(GatewayError):
    """401: no key, or not one the gateway knows (tenant or admin). Typed so the failed-auth
    limit per client address (gateway/app/endpoints.py) can count it without comparing codes."""

    def __init__(self, message: str, *, code: str = "invalid_api_key") -> None:
        super().__init__(401, message, type="authentication_error", code=code)


def hash_key(key: str) -> str:
    """The form a key is stored in the policy file."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What the gateway needs to know about a caller on every request."""

    name: str
    all_models: bool
    models: frozenset[str]
    default_priority: Priority
    max_priority: Priority

    def may_use(self, model: str) -> bool:
        return self.all_models or model in self.models


class Authenticator:
    """Maps a request's credential to its tenant, or raises a 401 GatewayError."""

    def __init__(self, config: GatewayConfig) -> None:
        self._by_digest: dict[bytes, tuple[bytes, TenantPolicy]] = {}
        for name, tenant in config.tenants.items():
            policy = TenantPolicy(
                name=name,
                all_models="*" in tenant.models,
                models=frozenset(tenant.models),
                default_priority=Priority[tenant.default_priority],
                max_priority=Priority[tenant.max_priority],
            )
            for stored in tenant.api_keys:
                digest = bytes.fromhex(stored.removeprefix("sha256:"))
                self._by_digest[digest] = (digest, policy)

    def authenticate(self, headers: Mapping[str, str]) -> TenantPolicy:
        key = _presented_key(headers)
        if not key:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'."
            )
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            # Never echo the key, not even a prefix: logs and clients may capture this message.
            raise AuthenticationFailed("Incorrect API key provided.")
        return found[1]


def _presented_key(headers: Mapping[str, str]) -> str:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()
