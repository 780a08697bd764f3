"""The demo's traffic: simulated customers, their events, and the requests of a run.

:class:`TrafficGenerator` makes realistic events for the four use cases of the example catalog,
deterministically from a seed; :func:`plan_requests` splits a run into requests with ~1% re-sent
unchanged; :class:`Traffic` hands out each request's events when it is about to go out.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

from meter_platform.capture.envelope import datetime_to_us

#: Share of the events re-sent unchanged, so the dedup is visible in the ledger.
RESEND_SHARE = 0.01
#: Fresh requests per re-send request (at least one re-send request per run).
RESEND_EVERY = 10
#: Customers of one run, and the exponent of their Zipf-like share of the traffic.
CUSTOMERS = 40
ZIPF_EXPONENT = 1.1
#: Event timestamps are "now" minus up to this much, as if clients buffered them briefly.
MAX_JITTER = timedelta(seconds=5)
_JITTER_US = MAX_JITTER // timedelta(microseconds=1)

# msgspec writes Decimal as a JSON number with exactly its digits: the value summed for the
# expectation is, character for character, the value the gateway receives.
_encoder = msgspec.json.Encoder(decimal_format="number")


def encode_events(events: Sequence[dict[str, Any]]) -> bytes:
    """The JSON array body of one request (Decimal values as plain JSON numbers)."""
    return _encoder.encode(list(events))


# --- the traffic ---------------------------------------------------------------------------------

REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-1", "sa-east-1")
COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "MX", "NG", "ES", "CA", "AU")
COMPANIES = (
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell", "cyberdyne",
    "soylent", "aperture", "vandelay", "pied-piper", "massive-dynamic", "oscorp", "gringotts", "monarch",
    "dunder", "bluth",
)  # fmt: skip
BUCKET_PURPOSES = ("assets", "backups", "logs", "media", "ml-datasets", "exports")
#: The product mix of an average customer; each customer varies it (and skips some products).
EVENT_TYPE_MIX = {
    "api_call": 50,
    "message_sent": 20,
    "analytics_query": 12,
    "storage_usage": 10,
    "call_completed": 8,
}
EVENT_TYPES = tuple(EVENT_TYPE_MIX)


class Weighted:
    """A weighted choice among fixed options (cumulative weights computed once: it runs per event)."""

    def __init__(self, weights: dict[Any, float]):
        self.options = tuple(weights)
        self.cumulative = tuple(itertools.accumulate(weights.values()))

    def pick(self, rng: random.Random) -> Any:
        """One option, chosen with probability proportional to its weight."""
        return self.options[bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])]


# What a typical REST API's traffic looks like: the share of each endpoint, and its methods.
ENDPOINTS = Weighted(
    {
        "/v1/users": 30,
        "/v1/search": 25,
        "/v1/orders": 20,
        "/v1/payments": 10,
        "/v1/files": 10,
        "/v1/webhooks": 5,
    }
)
METHODS = {
    "/v1/users": Weighted({"GET": 70, "POST": 15, "PATCH": 10, "DELETE": 5}),
    "/v1/search": Weighted({"GET": 100}),
    "/v1/orders": Weighted({"GET": 50, "POST": 40, "PUT": 10}),
    "/v1/payments": Weighted({"POST": 80, "GET": 20}),
    "/v1/files": Weighted({"GET": 40, "PUT": 50, "DELETE": 10}),
    "/v1/webhooks": Weighted({"POST": 100}),
}
STORAGE_CLASSES = Weighted({"standard": 60, "infrequent": 25, "archive": 15})
CHANNELS = Weighted({"sms": 35, "email": 35, "push": 20, "whatsapp": 10})
# Long SMS are split into 153-character segments; most fit in one.
SMS_SEGMENTS = Weighted({1: 70, 2: 18, 3: 6, 4: 3, 6: 2, 10: 1})
QUERY_TYPES = Weighted({"sql": 40, "dashboard": 35, "report": 15, "export": 10})


@functools.lru_cache(maxsize=64)
def _whole_second(epoch_second: int) -> str:
    return datetime.fromtimestamp(epoch_second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339(epoch_us: int) -> str:
    """Microseconds since the epoch as RFC 3339 UTC with six fractional digits and ``Z``.

    The same text as :func:`meter_platform.capture.envelope.format_timestamp`, without a strftime per event.
    """
    second, micro = divmod(epoch_us, 1_000_000)
    return f"{_whole_second(second)}.{micro:06d}Z"


def _exact(value: float, places: int) -> Decimal:
    """A random float turned, once, into an exact decimal with ``places`` digits after the point."""
    return Decimal(value).quantize(Decimal(1).scaleb(-places))


@dataclass(frozen=True)
class Bucket:
    """A storage bucket of one customer: its size drives the hourly gb_hours reports."""

    name: str
    storage_class: str
    region: str
    size_gb: float


@dataclass(frozen=True)
class Customer:
    """One simulated customer: who they are and which products they use how much."""

    customer_id: str
    company: str
    region: str
    countries: Weighted
    mix: Weighted
    buckets: tuple[Bucket, ...]
    user_agent: str
    ip_addresses: tuple[str, ...]


class TrafficGenerator:
    """Makes the events of one run, deterministically from ``seed`` (the token only names things).

    Every request's events come from their own random stream, seeded by the seed and the number of
    their first event, so the traffic is the same whatever order concurrent requests are made in.
    """

    def __init__(self, token: str, seed: int, customers: int = CUSTOMERS):
        self.token = token
        self.seed = seed
        self.customers = [self._customer(k) for k in range(1, customers + 1)]
        # Zipf-like: customer k gets a share proportional to 1/k^s, so a few big customers dominate
        # and a long tail sends little, as on any real usage-based platform.
        self.weights = [1 / k**ZIPF_EXPONENT for k in range(1, customers + 1)]

    def _customer(self, k: int) -> Customer:
        rng = random.Random(f"{self.seed}:customer:{k}")
        company = COMPANIES[(k - 1) % len(COMPANIES)] + ("" if k <= len(COMPANIES) else f"-{k}")
        region = rng.choice(REGIONS)
        # The first country is the customer's home market; the others see less traffic.
        countries = Weighted(dict(zip(rng.sample(COUNTRIES, rng.randint(1, 3)), (6, 1, 1), strict=False)))
        mix = {}
        for event_type, weight in EVENT_TYPE_MIX.items():
            # Everyone calls the API; about a quarter of the customers skip each other product.
            uses = event_type == "api_call" or rng.random() > 0.25
            mix[event_type] = weight * rng.uniform(0.2, 2.0) if uses else 0.0
        buckets = tuple(
            Bucket(
                name=f"{company}-{purpose}",
                storage_class=STORAGE_CLASSES.pick(rng),
                region=region if rng.random() < 0.8 else rng.choice(REGIONS),
                size_gb=rng.lognormvariate(5, 1.5),
            )
            for purpose in rng.sample(BUCKET_PURPOSES, rng.randint(1, 4))
        )
        version = f"{rng.randint(1, 4)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        ips = tuple(f"10.{k}.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(rng.randint(1, 3)))
        return Customer(
            customer_id=f"cust-{self.token}-{k:02d}",
            company=company,
            region=region,
            countries=countries,
            mix=Weighted(mix),
            buckets=buckets,
            user_agent=f"{company}-app/{version}",
            ip_addresses=ips,
        )

    @property
    def customer_ids(self) -> set[str]:
        """The customer ids of this run (no other run uses them)."""
        return {c.customer_id for c in self.customers}

    def events(self, first: int, count: int, now: datetime) -> list[dict[str, Any]]:
        """``count`` new events numbered from ``first``, stamped a few seconds before ``now``."""
        rng = random.Random(f"{self.seed}:events:{first}")
        customers = rng.choices(self.customers, self.weights, k=count)
        now_us = datetime_to_us(now)
        return [self._event(rng, first + i, customer, now_us) for i, customer in enumerate(customers)]

    def _event(self, rng: random.Random, n: int, customer: Customer, now_us: int) -> dict[str, Any]:
        event_type = customer.mix.pick(rng)
        return {
            "id": f"demo-{self.token}-{n}",
            "event_type": event_type,
            "customer_id": customer.customer_id,
            "timestamp": rfc3339(now_us - rng.randrange(_JITTER_US)),
            "properties": _PROPERTIES[event_type](rng, customer),
            "metadata": {
                "user_agent": customer.user_agent,
                "ip_address": rng.choice(customer.ip_addresses),
                "demo_run": self.token,
            },
        }


def _region(rng: random.Random, customer: Customer) -> str:
    return customer.region if rng.random() < 0.85 else rng.choice(REGIONS)


def _api_call(rng: random.Random, customer: Customer) -> dict[str, Any]:
    endpoint = ENDPOINTS.pick(rng)
    method = METHODS[endpoint].pick(rng)
    big = endpoint == "/v1/files" and method in ("GET", "PUT")
    return {
        "endpoint": endpoint,
        "method": method,
        "response_time_ms": _exact(rng.lognormvariate(4.0, 0.6) * (3 if big else 1), 1),
        "bytes_transferred": int(rng.lognormvariate(12, 1.5) if big else rng.lognormvariate(7.5, 1.0)),
        "region": _region(rng, customer),
    }


def _storage_usage(rng: random.Random, customer: Customer) -> dict[str, Any]:
    bucket = rng.choice(customer.buckets)
    # An hourly report: the bucket's size (drifting a little) times one hour, plus what was read out.
    egress = 0 if bucket.storage_class == "archive" or rng.random() < 0.3 else int(rng.lognormvariate(16, 2))
    return {
        "bucket": bucket.name,
        "storage_class": bucket.storage_class,
        "gb_hours": _exact(bucket.size_gb * rng.uniform(0.95, 1.05), 3),
        "egress_bytes": egress,
        "region": bucket.region,
    }


def _message_sent(rng: random.Random, customer: Customer) -> dict[str, Any]:
    channel = CHANNELS.pick(rng)
    segments = SMS_SEGMENTS.pick(rng) if channel == "sms" else 1
    return {"channel": channel, "country": customer.countries.pick(rng), "segments": segments}


def _call_completed(rng: random.Random, customer: Customer) -> dict[str, Any]:
    return {
        "direction": "outbound" if rng.random() < 0.55 else "inbound",
        "duration_minutes": _exact(rng.expovariate(1 / 3.2), 2),
        "country": customer.countries.pick(rng),
    }


def _analytics_query(rng: random.Random, customer: Customer) -> dict[str, Any]:
    query_type = QUERY_TYPES.pick(rng)
    cached = rng.random() < (0.5 if query_type == "dashboard" else 0.15)
    if cached:  # served from the result cache: nothing scanned, answered in milliseconds
        rows, duration = 0, rng.uniform(2, 40)
    else:
        rows = int(rng.lognormvariate(13 if query_type != "export" else 15, 2))
        duration = 20 + rows / rng.uniform(2_000, 20_000)
    return {
        "query_type": query_type,
        "rows_scanned": rows,
        "duration_ms": _exact(duration, 1),
        "cached": cached,
    }


_PROPERTIES = {
    "api_call": _api_call,
    "storage_usage": _storage_usage,
    "message_sent": _message_sent,
    "call_completed": _call_completed,
    "analytics_query": _analytics_query,
}


# --- the requests of a run -------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    """One request of the plan: ``count`` new events numbered from ``first``, or a re-send.

    A re-send (``resend_of`` set) carries the events at positions ``picks`` of an earlier request,
    unchanged: same ids, same timestamps, same values.
    """

    index: int
    count: int
    first: int = 0
    resend_of: int | None = None
    picks: tuple[int, ...] = ()


def plan_requests(events: int, batch_size: int, rng: random.Random) -> list[RequestSpec]:
    """The requests of a run: ``events`` new events in batches, with ~1% re-sent among them.

    Re-sends are spread over the run, each after the request it copies from.
    """
    fresh_counts = [min(batch_size, events - start) for start in range(0, events, batch_size)]
    budget = max(1, round(events * RESEND_SHARE)) if events else 0
    resends = min(budget, max(1, len(fresh_counts) // RESEND_EVERY)) if budget else 0
    # Re-send request r goes right after fresh request number after[r] (counting from 1).
    after = [math.ceil((r + 1) * len(fresh_counts) / (resends + 1)) for r in range(resends)]
    sizes = [budget // resends + (1 if r < budget % resends else 0) for r in range(resends)]
    plan: list[RequestSpec] = []
    fresh_index: list[int] = []  # plan index of each fresh request
    next_event = 1
    for f, count in enumerate(fresh_counts):
        plan.append(RequestSpec(index=len(plan), count=count, first=next_event))
        fresh_index.append(plan[-1].index)
        next_event += count
        for r in (r for r in range(resends) if after[r] == f + 1):
            source = plan[fresh_index[rng.randrange(f + 1)]]
            picks = tuple(sorted(rng.sample(range(source.count), min(sizes[r], source.count))))
            plan.append(RequestSpec(index=len(plan), count=len(picks), resend_of=source.index, picks=picks))
    return plan


class Traffic:
    """The events of each planned request, made when the request is about to go out.

    Only the events some later re-send will copy are kept (about 1%), so a long run does not hold
    every event it sent in memory.
    """

    def __init__(self, generator: TrafficGenerator, plan: list[RequestSpec]):
        self.generator = generator
        self.plan = plan
        self._resends_of: dict[int, list[RequestSpec]] = {}
        for spec in plan:
            if spec.resend_of is not None:
                self._resends_of.setdefault(spec.resend_of, []).append(spec)
        self._copies: dict[int, list[dict[str, Any]]] = {}

    @property
    def total_events(self) -> int:
        """Events in all requests, re-sends included."""
        return sum(spec.count for spec in self.plan)

    def events_for(self, spec: RequestSpec, now: datetime | None = None) -> list[dict[str, Any]]:
        """The events of ``spec``; a re-send's source request must have been made before."""
        if spec.resend_of is not None:
            return self._copies.pop(spec.index)
        events = self.generator.events(spec.first, spec.count, now or datetime.now(UTC))
        for resend in self._resends_of.pop(spec.index, []):
            self._copies[resend.index] = [events[i] for i in resend.picks]
        return events
