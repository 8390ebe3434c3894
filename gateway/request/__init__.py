"""What a request is: authentication, classification (ProxyCall), agent-loop detection."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .agent_loop import CanonicalCache, find_loop
from .auth import AuthenticationFailed, Authenticator, TenantPolicy, hash_key
from .classifier import (
    ROUTES,
    ApiRoute,
    ProxyCall,
    classify,
    error_dialect,
    estimate_answer_tokens,
    header_id,
    parse_json_body,
    raise_if_content_encoded,
    raise_if_json_content_type_wrong,
    reserved_output_tokens,
)
from .record import AttemptRecord, RequestRecord

__all__ = [
    "ROUTES",
    "ApiRoute",
    "AttemptRecord",
    "AuthenticationFailed",
    "Authenticator",
    "CanonicalCache",
    "ProxyCall",
    "RequestRecord",
    "TenantPolicy",
    "classify",
    "error_dialect",
    "estimate_answer_tokens",
    "find_loop",
    "hash_key",
    "header_id",
    "parse_json_body",
    "raise_if_content_encoded",
    "raise_if_json_content_type_wrong",
    "reserved_output_tokens",
]
