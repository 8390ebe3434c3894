"""Steps 7-11: pick a deployment, take its provider quota and a concurrency slot, call it,
judge the answer, and retry or fail over while that is still safe; then relay.

Rules that matter to users:
- nothing is retried once a byte went to the client (a success is relayed, never retried);
- retries go to another deployment first, within the retry budget and the deadline;
- a breaker trial is judged only on connect + first byte, and a cancelled client is never
  counted as an upstream failure;
- after the gateway gave up it says so (``x-should-retry: false``, ``x-gateway-attempts``), so
  SDKs do not multiply the retries.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from aiohttp import web

from gateway.admission import AdmissionRequest, Deadline, Permit, deadline_exceeded, is_client_retry
from gateway.breaker import Trial
from gateway.errors import GatewayError, RateLimited, UpstreamTimeout, retry_headers
from gateway.request import AttemptRecord, ProxyCall, RequestRecord
from gateway.translate import Translation
from gateway.upstream import (
    AttemptFailure,
    Target,
    UpstreamAttempt,
    decide_retry,
    gave_up_headers,
    is_event_stream,
    relay_stream,
    relay_whole,
    upstream_answer,
)
from gateway.usage import Usage

from .services import PolicyVersion, Services


@dataclass(slots=True)
class CallContext:
    request: web.Request | None  # None for a deferred run (gateway/deferred/service.py)
    policy: PolicyVersion
    svc: Services
    call: ProxyCall
    record: RequestRecord
    targets: list[Target]
    deadline: Deadline
    headers: dict[str, str]  # added to every answer (x-ratelimit-*, budget warnings)
    tokens: int  # reserved prompt + output tokens
    # Deferred runs: the stored client headers stand in for request.headers, and only a free
    # admission slot is taken (try_acquire, never queueing), so they never take a slot that
    # waiting interactive requests need.
    client_headers: Mapping[str, str] | None = None
    free_slot_only: bool = False
    on_permit: Callable[[], None] | None = None  # a slot was granted (deferred bookkeeping)

    @property
    def request_headers(self) -> Mapping[str, str]:
        if self.client_headers is not None:
            return self.client_headers
        assert self.request is not None
        return self.request.headers


@dataclass(slots=True)
class _Failed:
    """The last attempt's failure, kept to answer with if no retry follows."""

    failure: AttemptFailure
    error: GatewayError | None = None  # gateway-side (connect, timeout)
    status: int = 0  # or the upstream's own answer
    content_type: str = ""
    headers: Mapping[str, str] | None = None
    body: bytes = b""
    translation: Translation | None = None  # the deployment spoke the other dialect


async def attempt_loop(ctx: CallContext) -> web.StreamResponse:
    try:
        return await _attempt_loop(ctx)
    finally:
        # However the loop ended (answer, failure, the client's cancellation): each attempt
        # whose request reached the upstream and left no usage is charged a prompt estimate,
        # once, here (docs/architecture.md "Accounting").
        unaccounted, usage = ctx.record.attempts_unaccounted, ctx.record.usage
        usage.input_tokens += unaccounted * ctx.record.input_if_unreported
        # and the calls it reserved of tools billed per call, which the provider may have run
        for tool, calls in ctx.call.tool_calls.items() if unaccounted else ():
            usage.tool_calls[tool] = usage.tool_calls.get(tool, 0) + unaccounted * calls


async def _attempt_loop(ctx: CallContext) -> web.StreamResponse:
    svc, record = ctx.svc, ctx.record
    labels = [t.label for t in ctx.targets]
    by_label = {t.label: t for t in ctx.targets}
    tried: list[str] = []
    over_quota: set[str] = set()  # asked once per request: never spin on a spent quota
    last: _Failed | None = None
    ask = AdmissionRequest(
        ctx.call.priority, ctx.call.tenant.name, ctx.tokens, ctx.deadline.at, svc.clock(),
        ctx.call.agent_session, is_retry=is_client_retry(ctx.request_headers),
        prompt_tokens=ctx.call.prompt_tokens_estimate, streamed=ctx.call.stream,
        step=not ctx.call.route.request_only,
    )
    while True:
        # 7 route: an untried usable deployment first (failover), else the same one again
        candidates = [lb for lb in labels if lb not in over_quota]
        trial = await svc.breakers.begin_first(candidates, tried)
        if trial is None:
            # After one attempt, a provider's 429 the gateway meant to retry but cannot yet
            # (its cool-down outlasted the wait, another replica's 429 renewed it) is relayed
            # as it came, retryable: the gateway has not retried, and the 429 names the wait.
            return _give_up(ctx, last, tried, gave_up=last.failure.status != 429
                            or len(tried) > 1) if last else _raise(
                svc.breakers.unavailable_error(labels))
        target = by_label[trial.deployment]
        # 8 provider quota for the whole fleet; over it, this deployment cools down
        quota = await svc.quotas.take(target.deployment, ctx.tokens)
        if not quota.allowed:
            trial.cancelled()
            over_quota.add(target.label)
            svc.breakers.cool_down(target.label, quota.retry_after_s)
            last = last or _quota_spent(target.label, quota.retry_after_s)
            continue
        # 9 admission: queue for a slot on the first attempt; failover takes a free one only
        permit = await _permit(ctx, target.label, ask, first=not tried and not ctx.free_slot_only,
                               trial=trial)
        if permit is None:
            if target.label in tried:  # no free slot for it again: give up, never spin here
                return _give_up(ctx, last, tried) if last else _raise(
                    svc.breakers.unavailable_error(labels))
            tried.append(target.label)
            continue
        if trial.stale:  # its breaker opened while it queued: answer now, do not send
            permit.release("ignore")
            trial.cancelled()
            continue
        if ctx.on_permit is not None:
            ctx.on_permit()
        if not tried:
            record.queue_s = permit.queued_s
        tried.append(target.label)
        record.attempts = len(tried)
        record.deployment = target.label
        record.upstream_dialect = target.provider.kind
        # 10 attempt
        with svc.tracing.attempt_span(target.label, target.provider.kind, target.upstream_model,
                                      len(tried)) as span:
            result, failed = await _attempt(ctx, target, trial, permit)
            status = record.status if result is not None else (failed.status if failed else 0)
            span.finish(record.attempt_log[-1], status=status or None,
                        input_tokens=record.usage.input_tokens or None,
                        output_tokens=record.usage.output_tokens or None)
        if result is not None:
            return result
        assert failed is not None
        last = failed
        now = svc.clock()
        decision = decide_retry(
            ctx.policy.config.retries, failed.failure, attempt=len(tried),
            remaining_s=ctx.deadline.remaining(now), rng=svc.rng,
            failover_available=any(svc.breakers.usable(lb) for lb in labels if lb not in tried),
            deployment_wait_s=svc.breakers.retry_after_s([target.label]),
        )
        if not decision.retry:
            return _give_up(ctx, last, tried, gave_up=decision.gave_up)
        # Failing over to another deployment is free: it adds no load to the failing one, and
        # its breaker soon stops sending there at all. Retrying the same deployment spends
        # from its retry budget, which is what keeps an outage from multiplying the load.
        if not (trial.probe or decision.failover or svc.retry_budget.try_spend(target.label)):
            # The budget forbids the retry. After one attempt the gateway has not retried, so
            # it must not tell the SDK it did: a provider's 429 names its wait, and an SDK
            # retry spaced by it is no storm, so it is relayed as it came, retryable. After a
            # failover or a retry, and for any other failure, it stays final: that is what
            # keeps an outage from multiplying calls through every layer of retries.
            return _give_up(ctx, last, tried,
                            gave_up=last.failure.status != 429 or len(tried) > 1)
        for observer in svc.observers:
            observer.retry(target.label, decision.reason)
        if decision.delay_s > 0:
            await _sleep_until(svc.clock, now + decision.delay_s)
        left = ctx.deadline.remaining(svc.clock())
        if left <= 0:
            raise deadline_exceeded(left, 0.0, ctx.deadline.describe())


_EARLY_S = 0.05  # a timer this early is the loop's rounding, not a clock that stands still


async def _sleep_until(clock: Callable[[], float], when: float) -> None:
    """Sleep until ``clock()`` reaches ``when``. A timer can fire a little early: uvloop counts
    whole milliseconds from when its loop iteration began, and a retry that woke 0.6 ms before
    the cool-down its provider's 429 set found the deployment unusable and gave up (then told
    the SDK not to retry either). Only a shortfall under ``_EARLY_S`` is slept again, at most
    three times: an injected clock that stands still is not waited for."""
    await asyncio.sleep(max(0.0, when - clock()))
    for _ in range(3):
        left = when - clock()
        if not 0.0 < left < _EARLY_S:
            return
        await asyncio.sleep(left + 0.001)


async def _permit(ctx: CallContext, label: str, ask: AdmissionRequest, *, first: bool,
                  trial: Trial) -> Permit | None:
    began = ctx.svc.clock()
    try:
        if first:
            with ctx.svc.tracing.stage("queue"):
                return await ctx.svc.admission.acquire(label, ask)
        permit = ctx.svc.admission.try_acquire(label, ask)
    except BaseException:
        trial.cancelled()
        if first:  # shed or out of time after queueing: the log line shows where and how long
            ctx.record.queue_s, ctx.record.queue_refused = ctx.svc.clock() - began, True
            ctx.record.deployment = ctx.record.deployment or label
        raise
    if permit is None:
        trial.cancelled()
    return permit


async def _attempt(ctx: CallContext, target: Target, trial: Trial, permit: Permit) -> tuple[
    web.StreamResponse | None, _Failed | None
]:
    """One call to one deployment: the relayed answer, or how it failed (before any byte)."""
    svc, record = ctx.svc, ctx.record
    extra = ctx.deadline.upstream_headers(svc.clock())
    svc.tracing.inject(extra)  # traceparent of this attempt's span
    try:
        attempt = ctx.policy.upstreams.attempt(
            ctx.call, target, ctx.request_headers, record.request_id, deadline=ctx.deadline.at,
            extra_headers=extra, deadline_cause=ctx.deadline.describe(),
            client_deadline=ctx.deadline.client_set,
        )
    except BaseException:
        # Nothing was sent. The slot and the breaker's trial go back whatever went wrong:
        # a permit kept by an error here is held for good, and a few such requests took a
        # deployment's every slot from every tenant until a restart.
        trial.cancelled()
        permit.release("ignore")
        raise
    outcome, ttft, log = "ignore", None, AttemptRecord(target.label, "cancelled", 0.0)
    record.attempt_log.append(log)
    error_answer = False  # the upstream answered an error status: it did not do the work
    try:
        async with attempt:
            try:
                upstream = await attempt.open()
            except GatewayError as exc:
                timed_out = isinstance(exc, UpstreamTimeout)
                # A first byte that never came may be one stuck call, not a full upstream:
                # the limit tells them apart by the first tokens of the calls that did answer.
                outcome = "timeout" if timed_out else "overload"
                if isinstance(exc, UpstreamTimeout) and _impatient(
                        exc, target, svc.clock() - attempt.began,
                        ctx.policy.config.breaker.slow_first_token_s):
                    trial.neutral()
                    outcome = "client_timeout"  # a queue only if first tokens show one
                else:
                    trial.failure("timeout" if timed_out else "connect_error")
                log.outcome = exc.code or "error"
                failure = (AttemptFailure.first_byte_timeout() if timed_out
                           else AttemptFailure.connect_error())
                return None, _Failed(failure, error=exc)
            log.first_byte_s = record.first_byte_s = svc.clock() - attempt.began
            # The quota left, as the provider counts it (429s report it too): admission paces
            # this deployment's next requests by it.
            permit.observe_rate(upstream.headers, upstream.status)
            error_answer = upstream.status >= 400
            if error_answer:
                permit.no_first_token()
            if upstream.status < 400:
                trial.success(log.first_byte_s)
                svc.retry_budget.record_success(target.label)
                outcome, log.outcome = "success", "success"
                # First tokens feed the limit as they come, not when the answer ends.
                attempt.first_token_listener = permit.first_token
                if not is_event_stream(attempt.response):
                    permit.no_first_token()  # a whole body: nothing to wait for
                try:
                    return await _relay(ctx, attempt), None
                except GatewayError as exc:
                    # A whole answer broke off after its headers (cut, idle/total timeout, bad
                    # body). The upstream did the work and may bill it, so the gateway does not
                    # call again, and says so: SDK retries would multiply the calls the same way.
                    exc.headers = {**exc.headers, **_after_attempts(exc, record.attempts)}
                    raise
            try:
                body = await attempt.read_body()
            except GatewayError:  # the error body broke off: judged by its status alone
                body = b""
            failure = AttemptFailure.from_response(upstream.status, upstream.headers, body,
                                                   now_epoch_s=svc.wall_clock())
            if upstream.status == 429:
                trial.quota(failure.retry_after_s)
                outcome = "rate_limited"
            elif upstream.status >= 500:
                trial.failure("server_error")
                outcome = "overload"
            else:
                trial.neutral()
            log.outcome = f"http_{upstream.status}"
            return None, _Failed(failure, status=upstream.status,
                                 content_type=upstream.content_type,
                                 headers=upstream.headers.copy(), body=body,
                                 translation=ctx.call.translations.get(target.provider.kind))
    finally:
        trial.cancelled()  # no-op once judged: a cancel or any other exit is never counted
        log.duration_s = svc.clock() - attempt.began
        record.upstream_s = (record.upstream_s or 0.0) + log.duration_s
        if outcome == "success" and record.stream and record.ttft_s is not None:
            # From sending this attempt, not from the request's arrival: time spent queued in
            # the gateway says nothing about the upstream (and would feed back on the limit).
            ttft = max(0.0, record.started + record.ttft_s - attempt.began)
        permit.release(outcome, ttft_s=ttft)  # type: ignore[arg-type]
        if attempt.sent and not error_answer and _no_usage(record.usage):
            # Sent, then cancelled, timed out or cut before the relay accounted any usage:
            # the provider read the prompt (and may have answered it) all the same.
            record.attempts_unaccounted += 1


def _impatient(exc: UpstreamTimeout, target: Target, waited_s: float,
               slow_s: float | None) -> bool:
    """Whether a timeout is the client's impatience rather than the deployment's slowness:
    the client's own deadline (X-Request-Timeout, x-stainless-read-timeout) ran out before
    half the first-byte bound the deployment sets (its first-byte timeout, or its total one
    if shorter), and before a first byte would count as slow to the breaker
    (``breaker.slow_first_token_s``). Such a timeout is no failure to the breaker: counted,
    one tenant's X-Request-Timeout: 0.1 opened the breaker every tenant shares in ten calls.
    The adaptive limit reads it as a queue only when first tokens show one. A client that
    waited longer saw the deployment slow, and a deadline the gateway set (a class default,
    the tenant's cap) is the operator's: both count as before, so a deployment that hangs is
    still caught when every client sets a deadline (unless all of them are that short)."""
    timeouts = target.provider.timeouts
    bound = 0.5 * min(timeouts.first_byte_s, timeouts.total_s)
    if slow_s is not None:
        bound = min(bound, slow_s)
    return exc.client_deadline and waited_s < bound


def _no_usage(usage: Usage) -> bool:
    """Nothing accounted yet: only the relay of a 2xx answer fills the record's usage."""
    return not usage.reported and usage.input_tokens == 0 and usage.output_tokens == 0


async def _relay(ctx: CallContext, attempt: UpstreamAttempt) -> web.StreamResponse:
    """11 relay: streams event by event, anything else whole; in the client's dialect."""
    translation = ctx.call.translations.get(attempt.target.provider.kind)
    if ctx.call.stream and is_event_stream(attempt.response):
        assert ctx.request is not None  # deferred runs never stream
        handle = ctx.svc.self_protection.streams.open()
        try:
            return await relay_stream(ctx.request, ctx.call, attempt, ctx.record, ctx.headers,
                                      ctx.policy.config.server.client_write_idle_s,
                                      translation)
        finally:
            handle.release()
    return await relay_whole(attempt, ctx.record, ctx.headers, ctx.call.answer_model,
                             translation)


def _give_up(ctx: CallContext, last: _Failed, tried: list[str], *,
             gave_up: bool = True) -> web.Response:
    """Answer with the last failure; after the gateway's own retries, tell SDKs not to retry."""
    extra = dict(ctx.headers)
    if gave_up and tried:
        extra.update(gave_up_headers(len(tried)))
    if last.error is not None:
        if gave_up and tried:
            extra.update(_after_attempts(last.error, len(tried)))
        last.error.headers = {**last.error.headers, **extra}
        _raise_kept(last)
    ctx.record.status = last.status
    # The upstream's own error answer, relayed: not "ok" in the access log and the metrics.
    # Its 429 and 5xx are the upstream failing; its other 4xx refuse this request (a bad
    # parameter, an unknown model), which is no failure of the service.
    failing = last.status >= 500 or last.status == 429
    ctx.record.outcome = "upstream_error" if failing else "upstream_rejected"
    ctx.record.error_code = last.failure.error_code
    body = last.body
    if last.translation is not None and last.content_type.endswith("json"):
        body = last.translation.error(body, last.status)  # same status, same headers
    try:
        return upstream_answer(ctx.record.deployment or "", last.status, last.content_type,
                               last.headers or {}, body, extra)
    except GatewayError as exc:  # the upstream's answer was unusable (non-JSON, auth): a 502
        exc.headers = {**exc.headers, **extra}
        raise


def _after_attempts(error: GatewayError, attempts: int) -> dict[str, str]:
    """Headers for a gateway error answered after ``attempts`` calls: SDKs must not retry on
    top, except when the client's own deadline ran out (a client-side timeout would have
    been retried, so this stays retryable)."""
    headers = gave_up_headers(attempts)
    if isinstance(error, UpstreamTimeout) and error.client_deadline:
        headers["x-should-retry"] = "true"
    return headers


def _quota_spent(label: str, retry_after_s: float) -> _Failed:
    wait_ms = max(1, math.ceil(retry_after_s * 1000))
    error = RateLimited(
        f"The provider quota of {label} is used up for now; retry in {wait_ms} ms.",
        headers=retry_headers(wait_ms),
    )
    return _Failed(AttemptFailure.from_response(429, {"retry-after-ms": str(wait_ms)}), error)


def _raise(error: GatewayError) -> web.Response:
    """Raise ``error`` without a reference cycle: a frame that raises an exception it holds in a
    local (and every frame it passes through, if one of them holds it) is kept alive by the
    exception's traceback, and the whole request's objects with it, until a full GC pass.
    Under an upstream storm that was ~65 objects of garbage per failed request."""
    try:
        raise error
    finally:
        del error


def _raise_kept(failed: _Failed) -> NoReturn:
    """Raise the error a failed attempt kept, detached from it first: the attempt loop's frame
    holds ``failed`` and is on the traceback (see ``_raise``)."""
    error, failed.error = failed.error, None
    assert error is not None
    try:
        raise error
    finally:
        del error
