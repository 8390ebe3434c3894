"""The size of each stored Responses API answer, for the follow-ups that refer to it.

A request with ``previous_response_id`` makes the provider read the stored conversation up to
that response, which its body does not carry. Without knowing that conversation's size,
budgets and run caps reserve up to the model's context window for it (limiter.py,
``unseen_input_tokens``): exact enough for a daily budget, but a run cap below the window
refused every such step, and the last window of a budget served only requests that carried
their input. A stored response is immutable, and the provider reported what it read and wrote
(its ``usage``): that input plus that output is the conversation a follow-up refers to
(at most: a follow-up does not carry the earlier ``instructions`` forward). So the gateway
remembers it, per tenant, for ``state.remember_responses_s``, and reserves it instead of the
window; settlement charges what the provider then reports, as always. The same holds for the
answer's reasoning items, which an agent keeping its own history passes back by id (the
provider reads them from its store): each is at most the answer's reasoning tokens.

Remembered here (this replica, a bounded LRU) and, with Redis, in the store for every other
replica: one key per answer, expiring on its own, named by a digest of the tenant and the
id (a tenant never finds another tenant's answers; the keys spread over a Cluster's nodes
instead of sitting in the tenant's slot). A follow-up this replica served itself costs no
round trip.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

#: Answers (and reasoning items) this replica remembers itself per tenant, about 200 bytes
#: each: one tenant's stream of answers cannot push another tenant's out. Older ones are in
#: the store, with Redis.
TENANT_ENTRIES = 10_000
#: And all tenants together (about 40 MB): past it the oldest entry of the tenant holding the
#: most goes first.
ALL_ENTRIES = 200_000


def response_key(tenant: str, model: str, ident: str) -> str:
    """The name of a stored answer or reasoning item in the memory: 96 bits of a digest of
    the tenant, the public model it was made by and its id. A follow-up on another model
    is not sized by it: models count the same input differently (images most of all)."""
    # (lengths first: no tenant's and model's names and an id can spell another's)
    digest = hashlib.blake2b(f"{len(tenant)}:{len(model)}:{tenant}{model}{ident}".encode(
        "utf-8", "surrogatepass"), digest_size=12).digest()
    return base64.urlsafe_b64encode(digest).decode()


class ResponseSizes:
    """This replica's memory of stored sizes: tenant -> ``response_key`` -> tokens, each
    entry kept until its own expiry, a tenant's least recently used dropped past
    ``entries``. Tenants are the policy's, so the whole is bounded too."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 entries: int = TENANT_ENTRIES, all_entries: int = ALL_ENTRIES) -> None:
        self._clock = clock
        self._entries = entries
        self._all_entries = all_entries
        self._tenants: dict[str, OrderedDict[str, tuple[int, float]]] = {}
        self._held = 0

    def remember(self, tenant: str, key: str, tokens: int, ttl_s: float) -> None:
        now = self._clock()
        sizes = self._tenants.setdefault(tenant, OrderedDict())
        self._held -= len(sizes)
        # Expired entries at the front go as new ones come (entries share one TTL, so the
        # front is the oldest; a tenant gone quiet keeps its few until the bound below).
        while sizes and next(iter(sizes.values()))[1] <= now:
            sizes.popitem(last=False)
        sizes[key] = (tokens, now + ttl_s)
        sizes.move_to_end(key)
        while len(sizes) > self._entries:
            sizes.popitem(last=False)
        self._held += len(sizes)
        while self._held > self._all_entries:
            largest = max(self._tenants.values(), key=len)
            largest.popitem(last=False)
            self._held -= 1

    def size(self, tenant: str, key: str) -> int | None:
        """The remembered size, or None: never seen here, expired or dropped."""
        sizes = self._tenants.get(tenant)
        found = None if sizes is None else sizes.get(key)
        if found is None or sizes is None:
            return None
        if found[1] <= self._clock():
            del sizes[key]
            self._held -= 1
            return None
        sizes.move_to_end(key)
        return found[0]

    def __len__(self) -> int:
        return self._held
