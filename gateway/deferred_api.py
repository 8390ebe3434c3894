"""HTTP API of deferred requests (submitting is ``Prefer: respond-async`` on the API routes):

- ``GET /v1/deferred/{id}[?wait=N]``: the entry's status (queued, running, succeeded, failed,
  expired, cancelled), its runs, and once finished ``response``: the status code, headers and
  body a synchronous call would have answered. ``wait`` long-polls up to N seconds (capped by
  ``deferred.max_wait_s``) for a final status.
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

from .deferred import FINAL, unavailable, valid_id
from .deferred_store import Fields
from .errors import GatewayError, bad_request, not_found
from .state import StateUnavailable

if TYPE_CHECKING:
    from .context import RequestRecord
    from .runtime import Gateway


def add_routes(app: web.Application, gateway_key: web.AppKey[Gateway],
               record_key: web.RequestKey[RequestRecord]) -> None:
    def context(request: web.Request) -> tuple[Gateway, str, str]:
        gateway = request.app[gateway_key]
        tenant = gateway.policy.auth.authenticate(request.headers).name
        request[record_key].tenant = tenant
        entry_id = request.match_info["id"]
        if not valid_id(entry_id):
            raise _not_found(entry_id)
        return gateway, tenant, entry_id

    async def get(request: web.Request) -> web.Response:
        gateway, tenant, entry_id = context(request)
        wait = _wait_s(request, gateway.policy.config.deferred.max_wait_s)
        try:
            fields = await gateway.deferred.wait(tenant, entry_id, wait)
        except StateUnavailable:
            raise unavailable() from None
        if fields is None:
            raise _not_found(entry_id)
        return _json(view(entry_id, fields), status=200,
                     headers={} if _status(fields) in FINAL else {"Retry-After": "1"})

    async def response(request: web.Request) -> web.Response:
        gateway, tenant, entry_id = context(request)
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

    async def delete(request: web.Request) -> web.Response:
        gateway, tenant, entry_id = context(request)
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

    app.router.add_get("/v1/deferred/{id}", get)
    app.router.add_delete("/v1/deferred/{id}", delete)
    app.router.add_get("/v1/deferred/{id}/response", response)


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

