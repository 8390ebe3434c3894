"""HTTP API of deferred requests (submitting is ``Prefer: respond-async`` on the API routes):

- ``GET /v1/deferred/{id}[?wait=N]``: the entry's status (queued, running, succeeded, failed,
  expired, cancelled), its runs, and once finished ``response``: the status code, headers and
  body a synchronous call would have answered. ``wait`` long-polls up to N seconds (capped by
  ``deferred.max_wait_s``) for a final status. A tenant holds at most
  ``deferred.max_open_polls`` such polls open on one replica; beyond that a poll answers at once
  with the current status (never an error), and a poll whose client went away releases its
  slot at once.
- ``GET /v1/deferred/{id}/response``: that answer itself, byte for byte, with its own status
  code (409 ``deferred_not_finished`` before).
- ``DELETE /v1/deferred/{id}``: cancel a queued entry and refund its reservation (409 once it
  runs or has finished; cancelling a cancelled entry again is fine).

Only the submitting tenant sees its entries: they are looked up under the caller's tenant, so
another tenant's id is simply not found (404).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.deferred import FINAL, Fields, unavailable, valid_id
from gateway.errors import GatewayError, bad_request, not_found
from gateway.jsonbytes import WRITE_DEPTH, deeper_than
from gateway.state import StateUnavailable

if TYPE_CHECKING:
    from gateway.request import TenantPolicy

    from .endpoints import Routes
    from .runtime import Gateway


def add_routes(routes: Routes) -> None:
    """The deferred routes, as tenant routes (app/endpoints.py: authenticated and counted)."""
    gateway_key = routes.gateway_key
    open_polls: dict[str, int] = {}  # tenant -> ?wait= polls open on this replica

    def context(request: web.Request, tenant_policy: TenantPolicy) -> tuple[Gateway, str, str]:
        gateway = request.app[gateway_key]
        entry_id = request.match_info["id"]
        if not valid_id(entry_id):
            raise _not_found(entry_id)
        return gateway, tenant_policy.name, entry_id

    async def get(request: web.Request, tenant_policy: TenantPolicy) -> web.Response:
        gateway, tenant, entry_id = context(request, tenant_policy)
        config = gateway.policy.config.deferred
        wait = _wait_s(request, config.max_wait_s)
        headers: dict[str, str] = {}
        if wait > 0 and open_polls.get(tenant, 0) >= config.max_open_polls:
            wait = 0.0  # over the cap: the current status at once, never an error
            headers["x-gateway-wait-skipped"] = "too many open polls"
        try:
            if wait > 0:
                open_polls[tenant] = open_polls.get(tenant, 0) + 1
                try:
                    fields = await gateway.deferred.wait(tenant, entry_id, wait)
                finally:
                    # also when the client goes away: the gateway's runner cancels the handler
                    # of a closed connection (handler_cancellation=True, cli.py/lifecycle.py)
                    left = open_polls.pop(tenant) - 1
                    if left:
                        open_polls[tenant] = left
            else:
                fields = await gateway.deferred.store.get(tenant, entry_id)
        except StateUnavailable:
            raise unavailable() from None
        if fields is None:
            raise _not_found(entry_id)
        if _status(fields) not in FINAL:
            headers["Retry-After"] = "1"
        return _json(view(entry_id, fields), status=200, headers=headers)

    async def response(request: web.Request, tenant_policy: TenantPolicy) -> web.Response:
        gateway, tenant, entry_id = context(request, tenant_policy)
        try:
            fields = await gateway.deferred.store.get(tenant, entry_id)
        except StateUnavailable:
            raise unavailable() from None
        if fields is None:
            raise _not_found(entry_id)
        status = _status(fields)
        if status not in ("succeeded", "failed"):
            raise GatewayError(409, f"The deferred request {entry_id} has no answer: it is "
                               f"{status}.", code="deferred_not_finished",
                               headers={"Retry-After": "1"} if status not in FINAL else {})
        headers = orjson.loads(fields.get("rheaders", b"{}"))
        headers["x-deferred-id"] = entry_id
        headers["x-deferred-runs"] = fields.get("runs", b"0").decode()
        return web.Response(status=int(fields["code"]), body=fields.get("rbody", b""),
                            headers=headers)

    async def delete(request: web.Request, tenant_policy: TenantPolicy) -> web.Response:
        gateway, tenant, entry_id = context(request, tenant_policy)
        try:
            status = await gateway.deferred.cancel(tenant, entry_id)
            fields = await gateway.deferred.store.get(tenant, entry_id)
        except StateUnavailable:
            raise unavailable() from None
        if status == "missing":
            raise _not_found(entry_id)
        if status != "cancelled":
            raise GatewayError(409, f"The deferred request {entry_id} is {status}; only a "
                               "queued one can be cancelled.", code="deferred_not_cancellable")
        return _json(view(entry_id, fields) if fields else {"id": entry_id,
                                                            "status": "cancelled"})

    routes.tenant("GET", "/v1/deferred/{id}", get)
    routes.tenant("DELETE", "/v1/deferred/{id}", delete)
    routes.tenant("GET", "/v1/deferred/{id}/response", response)


def view(entry_id: str, fields: Fields) -> dict[str, Any]:
    """The entry as the API shows it."""
    status = _status(fields)
    runs = int(fields.get("runs", b"0"))
    out: dict[str, Any] = {
        "id": entry_id, "object": "deferred.request", "status": status,
        "endpoint": fields.get("route", b"").decode(), "model": fields.get("model", b"").decode(),
        "created_at": int(fields.get("created_ms", b"0")) // 1000,
        "expires_at": int(fields.get("expires_ms", b"0")) // 1000,
        "finished_at": int(fields["finished_ms"]) // 1000 if "finished_ms" in fields else None,
        "runs": runs,
        "run_log": [_run(fields, k, status, runs) for k in range(1, runs + 1)],
        "response": None,
    }
    if status in ("succeeded", "failed") and "code" in fields:
        raw = fields.get("rbody", b"")
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        if deeper_than(body, WRITE_DEPTH - 3):  # written two levels down in this view: an
            body = raw.decode("utf-8", "replace")  # answer nested past that, as its text
        out["response"] = {"status_code": int(fields["code"]),
                           "headers": orjson.loads(fields.get("rheaders", b"{}")), "body": body}
    return out


def _run(fields: Fields, k: int, status: str, runs: int) -> dict[str, Any]:
    info: dict[str, Any] = orjson.loads(fields.get(f"run:{k}", b"{}"))
    out: dict[str, Any] = {"run": k, **info}
    if "outcome" not in info:
        # started and never finished: still going, or its replica died (charged, run again)
        out["outcome"] = "running" if status == "running" and k == runs else "lost"
    charged = fields.get(f"charged:{k}")
    out["charged"] = charged.decode() if charged else "none"
    return out


def _status(fields: Fields) -> str:
    return fields["status"].decode()


def _wait_s(request: web.Request, cap: float) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise bad_request("wait must be a number of seconds, 0 or more.", param="wait")
    return min(value, cap)


def _not_found(entry_id: str) -> GatewayError:
    return not_found(f"No deferred request '{entry_id[:64]}' was found for this API key.",
                     code="deferred_not_found", param="id")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=headers)

