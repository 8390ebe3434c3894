"""Policy configuration: one YAML file, validated at load, unknown keys rejected.

Two configuration planes (never mixed):
- process settings come from the environment or CLI flags (``REDIS_URL``, ``--host``, ``--port``);
- policy comes from the YAML file described here.

Validation is strict on purpose. YAML 1.1 turns ``on``/``no`` into booleans, ``2023-06-01`` into
a date and ``1.10`` into the float 1.1; strict models refuse each of those where a string is
expected, and ``ConfigError`` names the file, the key path and a hint to quote the value.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.usage import Rates, micros

from .admission import AdmissionPolicy
from .base import PositiveFloat, Priority, PriorityName, StrictModel
from .breaker import BreakerPolicy
from .deferred import DeferredPolicy
from .limits import AgentLoop, Budget, Degraded, LoopGuard, RunBudget, TenantLimits
from .retry import RetryPolicy

__all__ = ["ConfigError", "GatewayConfig", "Priority", "PriorityName", "StrictModel"]

# Never passed upstream, whatever forward_headers says: credentials and hop-by-hop headers.
NEVER_FORWARDED = (
    "authorization", "x-api-key", "api-key", "cookie", "proxy-authorization", "connection",
    "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length",
    "proxy-connection",
)
log = logging.getLogger("gateway.config")
_SHA256_KEY = re.compile(r"^sha256:[0-9a-f]{64}$")


def _require_hashed(keys: list[str]) -> list[str]:
    for key in keys:
        if not _SHA256_KEY.match(key):
            raise ValueError(
                "api keys are stored as sha256:<64 lowercase hex>; "
                "run `gateway hash-key` to make one"
            )
    return keys


class Timeouts(StrictModel):
    """Hard limits on one upstream call, in seconds."""

    connect_s: PositiveFloat = Field(5.0, description="TCP + TLS connect")
    first_byte_s: PositiveFloat = Field(
        60.0, description="request sent -> response headers (non-streaming: the whole answer)"
    )
    idle_s: PositiveFloat = Field(30.0, description="longest gap between two stream chunks")
    total_s: PositiveFloat = Field(600.0, description="whole call, streams included")


class Provider(StrictModel):
    """An upstream API endpoint and the credential the gateway uses for it."""

    kind: Literal["openai", "anthropic"] = Field(
        description="openai: any OpenAI-compatible API; anthropic: the Messages API"
    )
    base_url: str = Field(
        description="what you would give the provider's SDK: https://api.openai.com/v1 "
        "or https://api.anthropic.com"
    )
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    api_key_file: str | None = Field(None, description="file holding the key (e.g. a Secret)")
    api_key: str | None = Field(
        None, description="inline key; refused unless allow_inline_secrets is true"
    )
    pool_size: int = Field(100, ge=1, le=10000, description="max open connections")
    verify_tls: bool = Field(True, description="verify the upstream's TLS certificate")
    ca_file: str | None = Field(
        None, description="PEM file of the CAs to trust for this provider instead of the "
        "system's (a private or corporate CA, a self-hosted model server)"
    )
    forward_headers: list[str] = Field(
        [],
        description="extra request headers passed through to this provider, by name or by "
        "prefix ending in * (e.g. x-mock-*); credentials and hop-by-hop headers never are",
    )
    timeouts: Timeouts = Timeouts()

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must start with http:// or https:// and name a host")
        return value.rstrip("/")

    @field_validator("forward_headers")
    @classmethod
    def _safe_headers(cls, names: list[str]) -> list[str]:
        out = []
        for name in names:
            lowered = name.lower()
            if not re.match(r"^[a-z0-9-]+\*?$", lowered):
                raise ValueError(f"'{name}' is not a header name or prefix*")
            prefix = lowered.rstrip("*")
            if any(p.startswith(prefix) if lowered.endswith("*") else p == lowered
                   for p in NEVER_FORWARDED):
                raise ValueError(f"'{name}' would forward a credential or hop-by-hop header")
            out.append(lowered)
        return out

    @model_validator(mode="after")
    def _ca_file_verifies(self) -> Provider:
        if self.ca_file and not self.verify_tls:
            raise ValueError("ca_file needs verify_tls: true (nothing is verified without it)")
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> Provider:
        sources = [s for s in (self.api_key_env, self.api_key_file, self.api_key) if s]
        if len(sources) > 1:
            raise ValueError("set at most one of api_key_env, api_key_file, api_key")
        return self


ServerTool = Literal["web_search", "web_fetch", "file_search", "code_interpreter",
                     "image_generation"]  # gateway/usage.py SERVER_TOOLS


class Price(StrictModel):
    """Price in the operator's currency per million tokens, per billed dimension.

    Costs are computed in integer micro-units of the currency (gateway/usage.py), so prices are
    used to the sixth decimal. A dimension left unset is priced like uncached input (the 1-hour
    cache write like the 5-minute one); ``GatewayConfig.price_warnings`` names the ones a
    provider is known to price differently.
    """

    input_per_million: float = Field(
        0.0, ge=0, description="uncached prompt tokens"
    )
    cached_input_per_million: float | None = Field(
        None, ge=0, description="prompt tokens read from the provider's prompt cache (OpenAI "
        "prompt_tokens_details.cached_tokens, Anthropic cache_read_input_tokens); providers "
        "bill them at 0.1x-0.5x input. Default: the input price, with a warning at load"
    )
    cache_write_per_million: float | None = Field(
        None, ge=0, description="prompt tokens written to the cache with the 5-minute TTL, or "
        "with a TTL the provider does not report (Anthropic cache_creation_input_tokens: "
        "1.25x input). Default: the input price, with a warning at load for Anthropic"
    )
    cache_write_1h_per_million: float | None = Field(
        None, ge=0, description="prompt tokens written to the cache with the 1-hour TTL "
        "(Anthropic cache_creation.ephemeral_1h_input_tokens: 2x input). Default: "
        "cache_write_per_million"
    )
    output_per_million: float = Field(
        0.0, ge=0, description="generated tokens, reasoning and predicted-output tokens "
        "included (the providers bill them as output)"
    )

    per_thousand_calls: dict[ServerTool, NonNegativeFloat] = Field(
        {}, description="price per 1,000 calls of a tool the provider runs and bills per "
        "call, beside the tokens (e.g. web_search: 10.0); counted from the answer (Responses "
        "web_search_call, file_search_call, code_interpreter_call, image_generation_call "
        "items; Anthropic usage.server_tool_use) and reserved at admission: the smaller of "
        "max_tool_calls and a tool's max_uses, else one call per such tool in the request. "
        "Unset: free"
    )

    _rates: Rates = PrivateAttr(default_factory=Rates)

    def model_post_init(self, context: Any, /) -> None:
        write_5m = _or(self.cache_write_per_million, self.input_per_million)
        self._rates = Rates(
            input=micros(self.input_per_million),
            cache_read=micros(_or(self.cached_input_per_million, self.input_per_million)),
            cache_write_5m=micros(write_5m),
            cache_write_1h=micros(_or(self.cache_write_1h_per_million, write_5m)),
            output=micros(self.output_per_million),
            per_thousand_calls=tuple((tool, micros(price))
                                     for tool, price in sorted(self.per_thousand_calls.items())
                                     if price > 0),
        )

    @property
    def rates(self) -> Rates:
        """The table in integer micro-units per million tokens, one per dimension."""
        return self._rates

    def unpriced(self, kind: str) -> list[str]:
        """The dimensions left at the input price that a provider of ``kind`` is known to
        price differently (OpenAI and Anthropic discount cache reads; Anthropic charges
        more for cache writes)."""
        if not self.input_per_million or not self.output_per_million:
            return []  # unpriced, or an embedding model (no output): no cache to price
        missing = []
        if self.cached_input_per_million is None and kind in ("openai", "anthropic"):
            missing.append("cached_input_per_million")
        if kind == "anthropic":
            if self.cache_write_per_million is None:
                missing.append("cache_write_per_million")
            if self.cache_write_1h_per_million is None:
                missing.append("cache_write_1h_per_million")
        return missing


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


class Deployment(StrictModel):
    """One place a model is served: a provider and the model name it knows."""

    provider: str = Field(description="name of an entry under providers")
    model: str = Field(description="the upstream's name for the model")
    requests_per_minute: int | None = Field(
        None, ge=1, description="what the provider grants for this deployment (RPM), enforced "
        "for the whole fleet so the fleet stops causing provider 429s"
    )
    tokens_per_minute: int | None = Field(None, ge=1, description="the provider's TPM")

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.model}"


class Model(StrictModel):
    """A public model name and where it is served, in failover order."""

    deployments: list[Deployment] = Field(
        min_length=1, description="where the model is served, tried in this order: the "
        "first usable one takes the request, the next ones take retries and failover"
    )
    context_window: int = Field(128_000, ge=1, description="prompt + output tokens the model "
                                "accepts; longer requests get a 400 before any upstream cost")
    max_output_tokens: int | None = Field(
        None, ge=1, description="the provider's maximum output tokens for this model; a "
        "request cap above it is refused or clamped (over_max_tokens). Unset: the gateway does "
        "not know it, refuses nothing the provider might accept, and reserves what the request "
        "asks for (at most context_window)"
    )
    over_max_tokens: Literal["refuse", "clamp"] = Field(
        "refuse", description="a request whose output cap (max_tokens, max_completion_tokens, "
        "max_output_tokens) is above max_output_tokens: refuse answers 400; clamp lowers it to "
        "max_output_tokens in the forwarded body, so the upstream cannot generate more than "
        "the gateway reserved"
    )
    answer_model: Literal["upstream", "alias"] = Field(
        "upstream", description="the `model` field of answers: upstream relays the name the "
        "deployment answered with (e.g. a dated snapshot, as OpenAI itself does, and which "
        "deployment served after a failover); alias rewrites it to this public model name"
    )
    price: Price = Price()

    @property
    def output_limit(self) -> int:
        """The most output one generation can have: the configured maximum, else the context
        window (no provider generates past it)."""
        return self.max_output_tokens or self.context_window


class Tenant(StrictModel):
    """A team or agent fleet, identified by its API keys."""

    api_keys: list[str] = Field(
        min_length=1, description="sha256:<hex> of each key (gateway hash-key prints one)"
    )
    models: list[str] = Field(["*"], description="public model names, or * for all")
    default_priority: PriorityName = Field(
        "normal", description="class of a request that sends no X-Priority header"
    )
    max_priority: PriorityName = Field(
        "high", description="most important class this tenant may ask for; a higher "
        "X-Priority is lowered to it"
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="output tokens reserved for a request that sets no output cap "
        "(capped by the model's max_output_tokens); an estimate, not sent upstream unless "
        "inject_max_tokens: the answer may be longer, and settlement charges what it really "
        "used (docs/architecture.md, Reservations, gives the bound on budget overshoot)"
    )
    inject_max_tokens: bool = Field(
        False, description="write default_max_tokens into the forwarded body of a request "
        "that sets no output cap, so its usage can never exceed the reservation; this changes "
        "what the model does (answers are cut at that length), so it is off by default"
    )
    max_tool_calls: int | None = Field(
        None, ge=1, description="the most calls of tools billed per call (web search, file "
        "search...) one request may make: written into a request with such tools that sets "
        "no bound (Responses max_tool_calls; Anthropic server tools' max_uses), and a larger "
        "bound lowered to it, so a cost budget holds the calls too; this changes what the "
        "model may do, so it is off by default (a request is then reserved one call per tool "
        "unless it sets a bound, and settlement charges the rest)"
    )
    limits: TenantLimits = TenantLimits()
    budget: Budget = Budget()
    loop_guard: LoopGuard = LoopGuard()
    agent_loop: AgentLoop = Field(
        AgentLoop(), description="the loop detector that reads the conversation's tool calls "
        "(warn by default)"
    )
    run_budget: RunBudget = Field(
        RunBudget(), description="caps on each agent run (X-Agent-Session): tokens, cost, "
        "steps, age; none by default"
    )

    @field_validator("api_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        return _require_hashed(keys)

    @model_validator(mode="after")
    def _default_within_max(self) -> Tenant:
        if Priority[self.default_priority] < Priority[self.max_priority]:
            raise ValueError("default_priority is more important than max_priority")
        return self


class AuthFailureLimit(StrictModel):
    """Failed authentications per client address (gateway/app/endpoints.py), counted in each
    replica's memory: beyond the limit the address is refused (429) before any key is
    compared, until a failure's worth of the window has passed."""

    max_failures: int = Field(
        20, ge=1, le=10_000, description="failed authentications (401: missing or wrong key, "
        "tenant or admin) one client address may make at once; the next is refused with 429 "
        "and a true Retry-After, before its key is compared"
    )
    window_s: PositiveFloat = Field(
        60.0, description="max_failures are forgiven over this long, evenly (one every "
        "window_s / max_failures seconds)"
    )
    max_addresses: int = Field(
        100_000, ge=100, le=10_000_000, description="addresses remembered per replica (the "
        "least recently failing are forgotten first); IPv6 addresses count by /64"
    )


class Server(StrictModel):
    """The listener and the process: address, body size, drain, metrics, event loop, CORS."""

    host: str = Field("127.0.0.1", description="listen address; --host overrides it "
                      "(0.0.0.0 in a container)")
    port: int = Field(8080, ge=0, le=65535, description="listen port; --port overrides it")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest request body "
                                "accepted; a larger one gets 413")
    max_body_values: int = Field(
        500_000, ge=1000, description="JSON values a request body may hold, weighed by what "
        "each costs to parse and check: a number or string 1, a list or object 6, an object's "
        "key 3 more; strings' own text not counted; a body with more gets 400 "
        "before it is parsed (JSON inside strings, such as tool-call arguments, is parsed up "
        "to 100,000 values a request). "
        "Parsing is on the event loop every tenant shares: 10 MB of nested empty lists took "
        "3.6 s of it, the bound keeps a body under about 0.1 s. 500,000 numbers is more than "
        "an embeddings request of token arrays may carry (300,000 tokens)"
    )
    backlog: int = Field(
        4096, ge=16, le=65535, description="listen backlog (capped by net.core.somaxconn): "
        "aiohttp's default 128 overflowed when thousands of agents connected at once"
    )
    max_connections: int | None = Field(
        None, ge=1, description="client connections this process holds open at once; a "
        "connection beyond it is closed as soon as it is accepted, before any byte is read, "
        "and counted in gateway_connections_refused_total{reason=\"max_connections\"}. "
        "null: the open-file limit (RLIMIT_NOFILE) less a reserve for upstream pools (the "
        "providers' pool_size), Redis, logs and files (at least 256 and a tenth of the limit); "
        "the soft limit is raised to the hard one at start"
    )
    max_connections_per_ip: int | None = Field(
        None, ge=1, description="client connections one peer address (an IPv6 /64) holds "
        "open at once in this process; beyond it the new connection is closed before any "
        "byte is read. Never applied to trusted_proxies (behind a load balancer every "
        "connection comes from the balancer: list it there). Per process: with --workers N "
        "an address may hold N times this. null: a quarter of max_connections, at least 256"
    )
    header_read_timeout_s: float = Field(
        15.0, gt=0, le=3600, description="a client connection must deliver a complete "
        "request head (request line and headers) within this long of connecting, or of its "
        "first byte after an idle keep-alive; else it is closed without an answer (an idle "
        "or header-trickling connection holds nothing longer). Idle keep-alive between "
        "requests is bounded separately (75 s)"
    )
    drain_delay_s: float = Field(
        5.0, ge=0, le=300, description="on SIGTERM: /readyz fails at once, but the listener "
        "keeps accepting this long so load balancers stop sending first (0: close at once)"
    )
    drain_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="after the listener closed: how long in-flight "
        "requests and streams may take to finish; the rest end with an error event. Keep "
        "Kubernetes' terminationGracePeriodSeconds above preStop + delay + this + ~10 s"
    )
    client_write_idle_s: float = Field(
        30.0, gt=0, le=3600, description="a stream write to a client that makes no progress "
        "this long (the client stopped reading) ends the request: the upstream call is "
        "cancelled, the admission slot and concurrency lease freed, and what was produced "
        "is charged. About the upstream idle timeout (providers.*.timeouts.idle_s)"
    )
    body_read_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="the whole request body must arrive within this "
        "long once the handler starts reading it; else 408 request_timeout and the "
        "connection is closed (a body that never finishes holds nothing longer)"
    )
    max_body_bytes_in_flight: int | None = Field(
        None, ge=1024, description="request-body bytes this process holds at once (bodies "
        "being read or in use by requests in flight, counted by Content-Length before "
        "reading); beyond it 503 overloaded with Retry-After, before the body is read. One "
        "tenant may hold half of what the other tenants leave of it (at least one body of "
        "max_body_bytes); beyond that its "
        "requests get 429 with Retry-After and the others keep the rest. null: a quarter of "
        "the cgroup memory limit, else 256 MiB; never below max_body_bytes"
    )
    refused_log_per_s: float = Field(
        1.0, ge=0, description="access-log lines per second for requests the gateway refused "
        "(never sent upstream), per tenant and reason, after a burst of 10; the rest are "
        "folded into one 'refused requests folded' line a minute with their counts. Metrics "
        "count every request regardless. 0: log every refusal"
    )
    metrics: bool = Field(
        True, description="serve Prometheus metrics on /metrics and record them per request "
        "(about 3 % of peak throughput, docs/benchmarks.md); false: no /metrics route"
    )
    metrics_need_admin_key: bool = Field(
        False, description="/metrics answers only with an admin key (Authorization: Bearer; "
        "Prometheus: `authorization: {credentials: ...}` in the scrape config): its series name "
        "every tenant with its budget, usage and limits. Off: anyone who reaches the port reads "
        "them, so keep that port off untrusted networks"
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="the event loop: uvloop (libuv; ~10 % less CPU per proxied "
        "request, see docs/benchmarks.md) or the standard library's asyncio; 'auto' takes "
        "uvloop when it is installed"
    )
    cors_origins: list[str] = Field(
        [], description="browser origins allowed to call the API (CORS); empty: CORS off. "
        "'*' allows any origin (credentials are never allowed)"
    )
    trusted_proxies: list[str] = Field(
        [], description="addresses or CIDR ranges of the load balancers in front of the "
        "gateway: from a peer in this list, the client address (for the failed-auth limit) is "
        "the first untrusted hop of X-Forwarded-For, read right to left; empty: "
        "X-Forwarded-For is never trusted and the peer address is the client"
    )
    auth_failures: AuthFailureLimit = Field(
        AuthFailureLimit(), description="limit on failed authentications per client address"
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"'{value}' is not an IP address or CIDR range") from None
        return values


class Admin(StrictModel):
    """Keys for the admin API (/admin/status); disjoint from every tenant's keys."""

    api_keys: list[str] = Field([], description="sha256:<hex> of each admin key")
    requests_per_minute: int = Field(
        120, ge=1, description="admin requests (/admin/status, /metrics when it needs the "
        "admin key) this replica answers per minute, all admin keys together; more get 429"
    )
    burst: int = Field(20, ge=1, description="admin requests allowed at once above that rate")

    @field_validator("api_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        return _require_hashed(keys)


class State(StrictModel):
    """Where limits, budgets, breaker state and deferred requests are shared."""

    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: this process only (one replica, one worker); redis: "
        "exact limits and budgets across every replica and worker"
    )
    redis_url: str | None = Field(
        None, description="redis://, rediss:// or redis+cluster://; REDIS_URL overrides"
    )
    timeout_s: PositiveFloat = Field(0.25, description="per Redis call; keep it tight")
    key_prefix: str = Field("gw:", description="prefix of every Redis key, so gateways "
                            "can share a Redis")
    remember_responses_s: float = Field(
        3600.0, ge=0, le=30 * 86_400, description="how long the size of each stored /v1/responses answer "
        "(and of its reasoning items) is remembered, so that a request referring to it "
        "(previous_response_id, reasoning items by id) reserves of budgets and run caps what "
        "it refers to rather than the model's whole context window; "
        "about 130 bytes of Redis per answer and per reasoning item; 0: not remembered"
    )
    degraded: Degraded = Degraded()


class GatewayConfig(StrictModel):
    """The whole policy file."""

    server: Server = Server()
    state: State = State()
    admission: AdmissionPolicy = AdmissionPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    retries: RetryPolicy = RetryPolicy()
    deferred: DeferredPolicy = DeferredPolicy()  # Prefer: respond-async (deferred_policy.py)
    admin: Admin = Admin()
    allow_inline_secrets: bool = Field(
        False, description="accept providers.*.api_key written in this file (tests, demos)"
    )
    providers: dict[str, Provider] = Field(
        min_length=1, description="upstream APIs by a name of your choice"
    )
    models: dict[str, Model] = Field(
        min_length=1, description="public model names clients send, each with its deployments"
    )
    tenants: dict[str, Tenant] = Field(
        min_length=1, description="who may call, by a name of your choice (used in metrics, "
        "logs and status)"
    )

    @model_validator(mode="after")
    def _cross_references(self) -> GatewayConfig:
        for name, model in self.models.items():
            for i, dep in enumerate(model.deployments):
                if dep.provider not in self.providers:
                    raise ValueError(
                        f"models.{name}.deployments.{i}.provider: unknown provider "
                        f"'{dep.provider}' (known: {', '.join(sorted(self.providers))})"
                    )
        seen: dict[str, str] = {}
        for tname, tenant in self.tenants.items():
            for model_name in tenant.models:
                if model_name != "*" and model_name not in self.models:
                    raise ValueError(f"tenants.{tname}.models: unknown model '{model_name}'")
            for model_name in tenant.limits.per_model:
                if model_name not in self.models:
                    raise ValueError(
                        f"tenants.{tname}.limits.per_model: unknown model '{model_name}'"
                    )
            for model_name in tenant.run_budget.per_model:
                if model_name not in self.models:
                    raise ValueError(
                        f"tenants.{tname}.run_budget.per_model: unknown model '{model_name}'"
                    )
            for key in tenant.api_keys:
                if key in seen and seen[key] != tname:
                    raise ValueError(
                        f"tenants.{tname}.api_keys: the same key is also given to '{seen[key]}'"
                    )
                seen[key] = tname
        self.deferred.check_tenants(set(self.tenants))
        if self.server.metrics_need_admin_key and not self.admin.api_keys:
            raise ValueError("server.metrics_need_admin_key: no admin.api_keys to present; "
                             "/metrics would refuse every scrape")
        for key in self.admin.api_keys:
            if key in seen:
                raise ValueError(f"admin.api_keys: the same key is also a key of tenant "
                                 f"'{seen[key]}'; admin keys must be separate")
        for pname, provider in self.providers.items():
            if provider.api_key and not self.allow_inline_secrets:
                raise ValueError(
                    f"providers.{pname}.api_key: inline secrets are refused; use api_key_env "
                    "or api_key_file, or set allow_inline_secrets: true"
                )
        return self

    def price_warnings(self) -> list[str]:
        """One line per model whose price table leaves a dimension at the input price that
        its providers bill differently: costs and cost budgets would overstate (cache reads)
        or understate (Anthropic cache writes) the bill."""
        out = []
        for name, model in self.models.items():
            kinds = sorted({self.providers[d.provider].kind for d in model.deployments})
            missing = sorted({m for kind in kinds for m in model.price.unpriced(kind)})
            if missing:
                out.append(f"models.{name}.price: {', '.join(missing)} not set; priced at "
                           f"input_per_million, but {'/'.join(kinds)} bills them differently")
        return out

    def budget_warnings(self) -> list[str]:
        """One line per tenant with a cost budget that can never count anything: no model the
        tenant may use has a price, so every request costs 0 (a warning, not an error: prices
        may be added later, and token budgets still hold)."""
        out = []
        for tname, tenant in self.tenants.items():
            set_ = [k for k in ("daily_cost", "monthly_cost")
                    if getattr(tenant.budget, k) is not None]
            names = self.models if "*" in tenant.models else tenant.models
            if set_ and not any(_priced(self.models[m].price) for m in names):
                out.append(f"tenants.{tname}.budget: {' and '.join(set_)} set, but no model "
                           "this tenant may use has a price (models.<name>.price): every "
                           "request costs 0 and the cost budget never refuses")
        return out


def _priced(price: Price) -> bool:
    return any(v for v in (price.input_per_million, price.output_per_million,
                           price.cached_input_per_million, price.cache_write_per_million,
                           price.cache_write_1h_per_million))


class ConfigError(Exception):
    """A policy file that cannot be used; the message names file, key path and reason."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _hint(value: Any) -> str:
    """Explain the YAML 1.1 traps that turn intended strings into other types."""
    if isinstance(value, bool):
        return " (YAML read an unquoted yes/no/on/off as a boolean; quote it)"
    if isinstance(value, (_dt.date, _dt.datetime)):
        return " (YAML read this as a date; quote it)"
    if isinstance(value, float):
        return " (YAML read this as a number, e.g. 1.10 became 1.1; quote it)"
    return ""


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        if not isinstance(err["loc"][-1], str):
            msg += _hint(err["loc"][-1])
    elif err["type"] == "invalid_key":
        parent = ".".join(str(p) for p in err["loc"][:-1])
        loc = f"{parent}.{err['input']!r}" if parent else repr(err["input"])
        msg = "keys must be strings" + _hint(err["input"])
    elif err["type"].startswith("string_type"):
        msg += _hint(err.get("input"))
    if msg.startswith(("models.", "tenants.", "providers.")):  # cross-reference errors
        return msg
    return f"{loc}: {msg}"


def parse_config(data: Any, path: str = "<config>") -> GatewayConfig:
    """Validate an already-loaded YAML document."""
    if not isinstance(data, dict):
        raise ConfigError(path, ["the file must contain a mapping at the top level"])
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, [_format_error(dict(e)) for e in exc.errors()]) from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a policy file; raises ConfigError."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [f"not valid YAML{where}: {problem}"]) from None
    config = parse_config(data, path)
    for warning in config.price_warnings() + config.budget_warnings():
        log.warning("%s: %s", path, warning)
    return config


def resolve_api_key(name: str, provider: Provider) -> str | None:
    """The provider's credential from its configured source; None for key-less upstreams."""
    if provider.api_key:
        return provider.api_key
    if provider.api_key_env:
        value = os.environ.get(provider.api_key_env)
        if not value:
            raise ConfigError(
                "environment", [f"providers.{name}.api_key_env: ${provider.api_key_env} is not set"]
            )
        return value.strip()
    if provider.api_key_file:
        try:
            return Path(provider.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                provider.api_key_file,
                [f"providers.{name}.api_key_file: cannot read: {exc.strerror}"],
            ) from None
    return None


def json_schema() -> dict[str, Any]:
    """JSON Schema of the policy file, for editors (config/schema.json is generated from it)."""
    schema = GatewayConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "LLM gateway policy"
    return schema
