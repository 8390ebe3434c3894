"""What one request carries through the pipeline: its ``RequestRecord`` and the record of
each upstream attempt.

``RequestRecord`` is filled in step by step; the access log line, the metrics and the span
attributes are all made from it, so they always agree. The objects the pipeline works with
(``PolicyVersion``, ``Services``) are in pipeline/services.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.usage import Usage


@dataclass(slots=True)
class AttemptRecord:
    """One upstream attempt: where, how it ended, how long it took."""

    deployment: str
    outcome: str  # success | http_<status> | connect_error | timeout | stream_cut | ...
    duration_s: float
    first_byte_s: float | None = None


@dataclass(slots=True)
class RequestRecord:
    """What one request did, filled in as it goes. The access log line, the metrics and the
    span attributes are all made from it, so they always agree."""

    request_id: str
    started: float  # the gateway's clock when the request arrived (Services.clock)
    route: str = ""
    tenant: str | None = None
    model: str | None = None
    deployment: str | None = None  # the one that answered (or was tried last)
    priority: str | None = None
    stream: bool = False
    status: int = 0
    # ok | rejected | shed | error | upstream_error | upstream_rejected | client_disconnected
    outcome: str = "ok"
    error_code: str | None = None
    attempts: int = 0
    attempt_log: list[AttemptRecord] = field(default_factory=list)
    # wait time at every step, in seconds (None: the step did not run)
    limits_s: float | None = None
    queue_s: float | None = None
    # queue_s ended in a refusal (shed, out of time): the access log shows it, the queue-wait
    # histogram (the wait of admitted requests, which its alert reads) does not
    queue_refused: bool = False
    first_byte_s: float | None = None  # upstream response headers, last attempt
    ttft_s: float | None = None  # first content event relayed to the client
    upstream_s: float | None = None
    total_s: float | None = None
    usage: Usage = field(default_factory=Usage)
    # Upstream attempts that were sent (the whole request written) but left no usage: cancelled,
    # timed out or cut before an answer was accounted. Each is charged a prompt estimate.
    attempts_unaccounted: int = 0
    cost: float = 0.0  # cost_micros / 1e6, for logs and metrics
    cost_micros: int = 0  # the exact charge in micro-units (gateway/usage.py)
    prompt_tokens_estimate: int = 0
    # Input the body refers to and does not carry, as the budgets reserved it (Hold): charged
    # with the estimate when the upstream reports no input (a cut stream, a cancelled call).
    unseen_input_reserved: int = 0
    context_window: int = 0
    agent_session: str | None = None
    agent_step: str | None = None
    # The agent run's totals after this request's admission (gateway/limits/runs.py): tokens, cost,
    # steps, age_s; fleet-wide for the capped ones. None: no X-Agent-Session.
    run: dict[str, float] | None = None
    loop: str | None = None  # the loop detector's finding on this request's conversation
    loop_action: str | None = None  # what was done about it: warn | refuse | shadow
    # the dialect of the deployment tried last; differs from the route's when translated
    upstream_dialect: str | None = None

    @property
    def input_if_unreported(self) -> int:
        """The input charged for an upstream call that reported none."""
        return self.prompt_tokens_estimate + self.unseen_input_reserved

    def set_cost(self, micros: int) -> None:
        self.cost_micros = micros
        self.cost = micros / 1e6
