"""The upstream client: one transport (connection pool) per provider, one ``UpstreamAttempt``
per call. The transport (upstream/transport.py) only moves bytes; timeouts and errors are decided here.

Security rules live here because this is the only code that talks to providers:
- the URL is ``provider.base_url + route path``, never anything from the request;
- the client's credentials are dropped and the provider's key is set;
- only an allow-list of request headers is forwarded (no hop-by-hop, no cookies, no client auth).

Every attempt has hard timeouts: connect, first byte (response headers), idle gap between body
chunks, and total, each also bounded by the request's own deadline. The body phases share one
watchdog timer per attempt that only notes the time of each read (a float store per chunk)
and re-arms itself once per idle period; when it fires it closes the response, which wakes
the pending read. A timer per chunk cost ~9 us per chunk on long streams.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Self

import aiohttp

from gateway import translate
from gateway.config import ConfigError, Deployment, GatewayConfig, Provider, resolve_api_key
from gateway.errors import UpstreamTimeout, upstream_failure
from gateway.jsonbytes import dumps_kept
from gateway.request import ProxyCall
from gateway.translate import TranslationRefused

from .transport import SentBody, Transport, TransportFactory, UpstreamResponse, aiohttp_transport

log = logging.getLogger("gateway.upstream")

# Request headers a client may pass through to the provider. Everything else is dropped.
FORWARDED_REQUEST_HEADERS = (
    "accept",
    "user-agent",
    "traceparent",
    "tracestate",
    "idempotency-key",
    "openai-beta",
    "anthropic-version",
    "anthropic-beta",
)
# Response headers passed back to the client besides the body's content type.
FORWARDED_RESPONSE_HEADERS = ("retry-after", "retry-after-ms")
ANTHROPIC_DEFAULT_VERSION = "2023-06-01"
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment resolved for one route: where to send and as which model."""

    provider_name: str
    provider: Provider
    upstream_model: str
    url: str
    deployment: Deployment

    @property
    def label(self) -> str:
        return self.deployment.label


class UpstreamPool:
    """Owns the provider transports and credentials; resolves a call's candidate targets.

    ``transport`` makes each provider's transport (``aiohttp_transport``: a pooled session);
    ``clock`` is the gateway's monotonic clock, which deadlines and measured times use."""

    def __init__(self, config: GatewayConfig, *,
                 transport: TransportFactory = aiohttp_transport,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._make_transport = transport
        self._clock = clock
        self._keys = {name: resolve_api_key(name, p) for name, p in config.providers.items()}
        self._tls = {name: _tls_context(name, p) for name, p in config.providers.items()}
        self._transports: dict[str, Transport] = {}

    async def start(self) -> None:
        for name, provider in self._config.providers.items():
            self._transports[name] = self._make_transport(name, provider, self._tls[name])

    async def close(self) -> None:
        transports, self._transports = self._transports, {}
        for transport in transports.values():
            await transport.close()

    def targets(self, call: ProxyCall) -> list[Target]:
        """The model's deployments that speak this route's API, in failover order."""
        model = self._config.models[call.model]
        found = []
        refused: TranslationRefused | None = None
        for dep in model.deployments:
            provider = self._config.providers[dep.provider]
            if provider.kind == call.route.provider_kind:
                url = provider.base_url + call.route.upstream_path
            elif translate.translates(call.route.path):
                # Another provider kind: reachable through translation, unless this body
                # cannot be carried there unchanged (then that deployment is left out).
                try:
                    self._translation(call, provider.kind)
                except TranslationRefused as exc:
                    refused = refused or exc
                    continue
                url = provider.base_url + translate.upstream_path(provider.kind)
            else:
                continue
            found.append(Target(dep.provider, provider, dep.model, url, dep))
        if not found and refused is not None:
            raise refused
        return found

    def _translation(self, call: ProxyCall, kind: Literal["openai", "anthropic"]) -> None:
        if kind in call.translations:
            return
        model = self._config.models[call.model]
        tenant = self._config.tenants.get(call.tenant.name)
        # Anthropic needs a cap: the body's, else what the reservation assumes per answer
        # (classify.reserved_output_tokens), so the upstream cannot outgrow the reservation.
        default = min(tenant.default_max_tokens if tenant else 1024, model.output_limit)
        call.translations[kind] = translate.plan(
            call.route.dialect, kind, call.body, default_max_tokens=default,
            include_usage=call.client_wants_usage)

    def attempt(
        self, call: ProxyCall, target: Target, headers: Mapping[str, str], request_id: str,
        deadline: float | None = None, extra_headers: Mapping[str, str] | None = None,
        deadline_cause: str = "the request's deadline", client_deadline: bool = False,
    ) -> UpstreamAttempt:
        """``deadline_cause`` names the deadline in a timeout's message (``Deadline.describe``);
        ``client_deadline``: it is the client's own, so running out of it stays retryable."""
        translated = call.translations.get(target.provider.kind)
        body = dict(translated.request.body if translated else call.body)
        body["model"] = target.upstream_model
        if call.stream and call.route.injects_stream_usage and not call.client_wants_usage \
                and translated is None:
            # Ask for usage so every stream can be accounted; the relay strips the extra chunk.
            options = dict(call.body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        out_headers = _upstream_headers(headers, target.provider, self._keys[target.provider_name])
        _forward_extra(headers, target.provider.forward_headers, out_headers)
        out_headers["x-client-request-id"] = request_id
        if extra_headers:
            out_headers.update(extra_headers)  # the gateway's own: deadline budget, traceparent
        return UpstreamAttempt(
            self._transports[target.provider_name], target, dumps_kept(body), out_headers,
            deadline, deadline_cause, client_deadline, deadline_covers_body=not call.stream,
            clock=self._clock,
        )


def _tls_context(name: str, provider: Provider) -> ssl.SSLContext | bool:
    """How calls to the provider verify TLS: the system CAs (True), the ``ca_file``'s, or not."""
    if not provider.verify_tls:
        return False
    if not provider.ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=provider.ca_file)
    except (OSError, ssl.SSLError) as exc:  # missing, unreadable, or not PEM certificates
        raise ConfigError(provider.ca_file, [(
            f"providers.{name}.ca_file: cannot load CA certificates: "
            f"{getattr(exc, 'strerror', None) or exc}")]) from None


def _upstream_headers(incoming: Mapping[str, str], provider: Provider, key: str | None) -> dict[
    str, str
]:
    out = {"content-type": "application/json"}
    for name in FORWARDED_REQUEST_HEADERS:
        value = incoming.get(name)
        if value is not None:
            out[name] = value
    if provider.kind == "anthropic":
        out.setdefault("anthropic-version", ANTHROPIC_DEFAULT_VERSION)
        if key:
            out["x-api-key"] = key
    elif key:
        out["authorization"] = f"Bearer {key}"
    return out


def _forward_extra(incoming: Mapping[str, str], allowed: list[str], out: dict[str, str]) -> None:
    """The provider's own forward_headers (validated at load to exclude credentials)."""
    if not allowed:
        return
    for name, value in incoming.items():
        lowered = name.lower()
        for rule in allowed:
            if lowered == rule or (rule.endswith("*") and lowered.startswith(rule[:-1])):
                out[lowered] = value
                break


class UpstreamAttempt:
    """One HTTP call to one target, with every phase under a deadline.

    Use as ``async with attempt:``; ``open()`` returns once the response headers arrived,
    ``read_body()`` / ``next_chunk()`` read the rest. Failures become ``GatewayError`` (502 for
    connection problems, 504 for timeouts) whose ``code`` says which phase failed.

    ``deadline`` is on ``clock`` (the gateway's); the attempt moves it to the real clock its
    timers run on, so the gateway's clock may be a fake one in tests.
    """

    def __init__(
        self,
        transport: Transport,
        target: Target,
        body: bytes,
        headers: dict[str, str],
        deadline: float | None,
        deadline_cause: str = "the request's deadline",
        client_deadline: bool = False,
        deadline_covers_body: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.clock = clock
        self._transport = transport
        self._body = body
        self._headers = headers
        self._loop = asyncio.get_running_loop()
        timeouts = target.provider.timeouts
        # Timers (call_at, timeout_at) need the loop's clock, a real one whatever the gateway's.
        self.started = self._loop.time()
        # Measured times use the gateway's clock (by default time.monotonic(): uvloop's
        # loop.time() has millisecond resolution).
        self.began = clock()
        if deadline is not None:
            # The same instant on the real monotonic clock the loop's timers follow (a no-op
            # when the gateway's clock is that one): the gateway's clock may be a test's fake.
            deadline += time.monotonic() - self.began
        end = self.started + timeouts.total_s
        # The deadline is when the client needs the first byte; for a whole answer that is
        # the end of it. A stream only has to start by then: after that the client's read
        # timeout is a gap between chunks (the idle timeout's business), as with the provider
        # itself, so a flowing stream is not cut at the client's read timeout.
        self._first_byte_deadline = deadline
        body_deadline = deadline if deadline_covers_body else None
        self._end = min(end, body_deadline) if body_deadline is not None else end
        # Whether the request's deadline, not the total timeout, ends the call: a timeout then
        # names the deadline (and whose it is), never a configured number that did not apply.
        self._deadline_ends = body_deadline is not None and body_deadline < end
        self._deadline_cause = deadline_cause
        self._client_deadline = client_deadline
        self._response: UpstreamResponse | None = None
        self._last_read = self.started
        self._watchdog: asyncio.TimerHandle | None = None
        self._expired: str | None = None  # "idle" or "total" once the watchdog fired
        self._payload: SentBody | None = None
        # Told the seconds from sending to the first relayed token, when it comes (admission's
        # queue signal: pipeline/attempts.py sets it).
        self.first_token_listener: Callable[[float], None] | None = None

    def first_token(self) -> None:
        """The relay passed on the answer's first token. A listener that fails is logged, not
        raised: the stream is already the client's."""
        if self.first_token_listener is not None:
            try:
                self.first_token_listener(self.clock() - self.began)
            except Exception:
                log.exception("first-token listener failed",
                              extra={"fields": {"deployment": self.target.label}})

    @property
    def sent(self) -> bool:
        """The whole request was written to the upstream: the provider may have read the
        prompt and may bill it, whatever happens to the call from here."""
        return self._payload is not None and self._payload.sent

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._response is not None:
            # close(), not release(): a half-read body must not go back to the pool, and the
            # upstream must see the disconnect at once (a cancelled client stops generation).
            self._response.close()

    @property
    def end(self) -> float:
        """``loop.time()`` by which the whole call is over: total timeout or the deadline."""
        return self._end

    @property
    def response(self) -> UpstreamResponse:
        assert self._response is not None, "open() first"
        return self._response

    async def open(self) -> UpstreamResponse:
        when = min(self.started + self.target.provider.timeouts.first_byte_s, self._end)
        if self._first_byte_deadline is not None:
            when = min(when, self._first_byte_deadline)
        try:
            async with asyncio.timeout_at(when):
                self._payload = SentBody(self._body)
                self._response = await self._transport.post(
                    self.target.url, self._payload, self._headers)
        except TimeoutError:
            raise self._timed_out("first_byte") from None
        except aiohttp.ClientConnectorError as exc:
            raise upstream_failure(
                502, f"Could not connect to the upstream {self.target.label}: {exc.os_error}",
                "upstream_connect_error",
            ) from None
        except aiohttp.ServerTimeoutError:
            raise self._timed_out("connect") from None
        except aiohttp.ClientError as exc:
            raise upstream_failure(
                502, f"The upstream {self.target.label} closed the connection: "
                f"{type(exc).__name__}", "upstream_disconnected",
            ) from None
        self._last_read = self._loop.time()
        self._arm()
        return self._response

    def _arm(self) -> None:
        idle = self.target.provider.timeouts.idle_s
        self._watchdog = self._loop.call_at(min(self._last_read + idle, self._end), self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._end:
            self._expired = "total"
        elif now - self._last_read >= self.target.provider.timeouts.idle_s:
            self._expired = "idle"
        else:
            self._arm()  # data arrived since: look again one idle period after the last read
            return
        if self._response is not None:
            self._response.close()  # wakes the pending read, which reports the timeout

    async def read_body(self) -> bytes:
        """The whole (non-streamed) body, within the idle and total limits."""
        chunks: list[bytes] = []
        size = 0
        while chunk := await self.next_chunk():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise upstream_failure(
                    502, f"The upstream {self.target.label} sent more than "
                    f"{MAX_RESPONSE_BYTES} bytes.", "upstream_response_too_large",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def next_chunk(self) -> bytes:
        """The next piece of body as it arrives; b"" at the end."""
        try:
            data = await self.response.content.readany()
        except (aiohttp.ClientError, ConnectionError) as exc:
            if self._expired:
                raise self._timed_out(self._expired) from None
            raise upstream_failure(
                502, f"The upstream {self.target.label} broke off the response: "
                f"{type(exc).__name__}", "upstream_stream_cut",
            ) from None
        if self._expired:  # closed by the watchdog: a short read, not the real end
            raise self._timed_out(self._expired)
        self._last_read = self._loop.time()
        return data

    def _timed_out(self, phase: str) -> UpstreamTimeout:
        """The 504 for ``phase`` running out, naming the bound that really ended it: the
        deployment's configured timeout for that phase, or the request's deadline when that
        came first (for the first byte and the total; idle gaps are the deployment's own)."""
        limits = self.target.provider.timeouts
        seconds = {
            "connect": limits.connect_s, "first_byte": limits.first_byte_s,
            "idle": limits.idle_s, "total": limits.total_s,
        }[phase]
        code = f"upstream_{phase}_timeout"
        configured = self.started + min(limits.first_byte_s, limits.total_s)
        by_deadline = (phase == "total" and self._deadline_ends) or (
            phase == "first_byte" and self._first_byte_deadline is not None
            and self._first_byte_deadline < configured)
        if by_deadline:
            waiting = "the first byte" if phase == "first_byte" else "the rest of the answer"
            return UpstreamTimeout(
                f"{self._deadline_cause[0].upper()}{self._deadline_cause[1:]} ran out while "
                f"waiting for {waiting} from the upstream {self.target.label}.", code,
                client_deadline=self._client_deadline)
        return UpstreamTimeout(
            f"The upstream {self.target.label} exceeded the deployment's "
            f"{phase.replace('_', ' ')} timeout ({seconds:g} s).", code)
