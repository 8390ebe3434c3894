"""The upstream transport: how one attempt sends its request and reads the answer.

``UpstreamAttempt`` (upstream/pool.py) owns everything that is policy: timeouts, the deadline,
which failure is which error. A ``Transport`` only moves bytes to one provider and back:

- ``AiohttpTransport``, the real one: one aiohttp ``ClientSession`` per provider (its pool
  size, TLS and connect timeout), made by ``aiohttp_transport``;
- ``MockTransport``, which answers in-process from a handler, with no socket at all, for
  tests that drive the whole app (``Gateway(transport=MockTransport(handler))``).

The contract a transport keeps, which the attempt relies on:
- ``post`` returns once the response headers arrived, and marks the ``SentBody`` sent once
  the whole request was handed to the provider;
- failures are aiohttp's exceptions (``ClientConnectorError``, ``ServerTimeoutError``, other
  ``ClientError``): the attempt maps them to the gateway's errors;
- ``UpstreamResponse.close()`` wakes a pending ``content.readany()``, which then raises
  ``aiohttp.ClientError``: that is how the attempt's watchdog ends an idle or overlong body.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import Provider


class SentBody(aiohttp.BytesPayload):
    """The request body, knowing when it was written in full to the upstream's connection:
    from then on the provider may read the prompt and bill it, whatever happens to the call
    (cancel, timeout, cut), so pipeline/attempts.py charges it. A payload rather than an aiohttp trace:
    a trace config fires every request signal on every call (+11 % per call, bench/sent_body.py),
    this one costs nothing measurable. It holds no reference to its attempt (no cycle)."""

    sent = False

    def __init__(self, body: bytes) -> None:
        super().__init__(body, content_type="application/json")
        self.body = body

    async def write(self, writer: AbstractStreamWriter) -> None:
        await super().write(writer)
        self.sent = True

    async def write_with_length(self, writer: AbstractStreamWriter,
                                content_length: int | None) -> None:
        await super().write_with_length(writer, content_length)
        self.sent = True


class ResponseBody(Protocol):
    async def readany(self) -> bytes:
        """The next piece of body as it arrives; b"" at the end."""


class UpstreamResponse(Protocol):
    """What the gateway reads of an upstream's answer (``aiohttp.ClientResponse`` is one)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_type(self) -> str: ...

    @property
    def content(self) -> ResponseBody: ...

    def close(self) -> None:
        """Drop the connection (never back to a pool half read); wakes a pending read."""


class Transport(Protocol):
    """Sends the requests of one provider."""

    async def post(self, url: str, body: SentBody,
                   headers: Mapping[str, str]) -> UpstreamResponse: ...

    async def close(self) -> None:
        """Release connections; called once the pool that made it is retired."""


# (provider name, provider, its TLS setting) -> the provider's transport, called when the
# pool starts (inside the running loop).
TransportFactory = Callable[[str, Provider, ssl.SSLContext | bool], Transport]


class AiohttpTransport:
    """A provider's requests over one aiohttp ``ClientSession`` (its connection pool)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def post(self, url: str, body: SentBody,
                   headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        return await self._session.post(url, data=body, headers=headers)

    async def close(self) -> None:
        await self._session.close()


def aiohttp_transport(name: str, provider: Provider,
                      tls: ssl.SSLContext | bool) -> AiohttpTransport:
    """The production transport: a pooled session per provider."""
    connector = aiohttp.TCPConnector(
        limit=provider.pool_size,
        ssl=tls,
        enable_cleanup_closed=False,
    )
    return AiohttpTransport(aiohttp.ClientSession(
        connector=connector,
        # Our own timers bound every phase; aiohttp's 5-minute default must not cut in.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=provider.timeouts.connect_s),
        auto_decompress=True,
        # One session serves every tenant: a cookie an upstream sets (load balancer,
        # bot management) must not ride along on later calls, whoever makes them.
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    ))


# --- the in-process fake ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MockRequest:
    """One request as the upstream would have received it."""

    url: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(slots=True)
class MockResponse:
    """An answer from a ``MockTransport`` handler: ``chunks`` are read one per ``readany``
    (an async iterable may pause between them, as a stream would)."""

    status: int = 200
    body: bytes | Iterable[bytes] | AsyncIterable[bytes] = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @classmethod
    def json(cls, data: Any, status: int = 200,
             headers: Mapping[str, str] | None = None) -> MockResponse:
        return cls(status, orjson.dumps(data), dict(headers or {}))


MockHandler = Callable[[MockRequest], Awaitable[MockResponse]]


class MockTransport:
    """A transport that calls ``handler`` instead of the network. Pass it where a
    ``TransportFactory`` is wanted: every provider then shares it. ``requests`` keeps what
    was sent, in order."""

    def __init__(self, handler: MockHandler) -> None:
        self._handler = handler
        self.requests: list[MockRequest] = []

    def __call__(self, name: str, provider: Provider, tls: ssl.SSLContext | bool) -> MockTransport:
        return self

    async def post(self, url: str, body: SentBody,
                   headers: Mapping[str, str]) -> UpstreamResponse:
        request = MockRequest(url, dict(headers), body.body)
        self.requests.append(request)
        body.sent = True  # the handler has the whole request, as a provider would
        answer = await self._handler(request)
        return _MockUpstreamResponse(answer)

    async def close(self) -> None:
        pass


class _MockBody:
    def __init__(self, body: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> None:
        self._chunks = _aiter([body] if isinstance(body, bytes) else body)
        self._closed = asyncio.Event()

    def close(self) -> None:
        self._closed.set()

    async def readany(self) -> bytes:
        if self._closed.is_set():
            raise aiohttp.ClientConnectionError("Connection closed")
        chunk = asyncio.ensure_future(anext(self._chunks, b""))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((chunk, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not chunk.done():
                chunk.cancel()
        if chunk.cancelled() or not chunk.done():
            raise aiohttp.ClientConnectionError("Connection closed")
        return chunk.result()


class _MockUpstreamResponse:
    def __init__(self, answer: MockResponse) -> None:
        self.status = answer.status
        self.content_type = answer.content_type
        headers = CIMultiDict(answer.headers)
        headers.setdefault("Content-Type", answer.content_type)
        self.headers = CIMultiDictProxy(headers)
        self.content = _MockBody(answer.body)

    def close(self) -> None:
        self.content.close()


async def _aiter(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk
