"""``meter demo``: send realistic usage traffic through the gateway, then prove every event was counted once.

The demo plays the four use cases of the example catalog (API management, cloud storage, communication
APIs, analytics) for a few dozen customers with a skewed, Zipf-like share of the traffic, and re-sends
about 1% of the events unchanged, as a client retrying after a lost answer would. While sending it
computes, from exactly the JSON it sends, what every meter must show; afterwards it waits for the
pipeline to drain and compares those totals with the gateway's usage API.

Each run uses its own token in event ids (``demo-<token>-<n>``) and customer ids
(``cust-<token>-<k>``), so earlier runs in the same time range never blur the comparison.

The pieces are plain functions and classes (:class:`TrafficGenerator`, :func:`plan_requests`,
:class:`Traffic`, :class:`Expectation`) so the tests can check the traffic and the expected totals
without a network; :func:`run_demo` puts them together against a gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import itertools
import json
import math
import random
import secrets
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO

import httpx
import msgspec
from tqdm import tqdm

from meter_platform.capture.envelope import datetime_to_us, format_timestamp, property_at
from meter_platform.catalog import Catalog, Meter

#: Requests in flight at once: enough to keep the gateway's JetStream publishes (each an fsync) busy.
CONCURRENCY = 8
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
#: How long to wait for the pipeline to count the run's events before giving up.
WAIT_TIMEOUT = 300.0
#: Usage queries cover the run with this margin on each side (timestamps carry jitter; clocks drift).
QUERY_MARGIN = timedelta(minutes=5)
#: How often a request is retried after a 503 or a connection error before the demo gives up.
MAX_ATTEMPTS = 30

EXIT_MATCH, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2

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


# --- what the meters must show ----------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python, but not in a meter's filter: a boolean only matches a boolean.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _numeric(value: Any) -> bool:
    if isinstance(value, float):
        # The platform sums the JSON text exactly; a float here would make the expectation inexact.
        raise TypeError(f"expected totals are exact: send numbers as int or Decimal, not float ({value!r})")
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


class Expectation:
    """Expected totals per meter from the events the gateway accepted, each id counted once.

    Handles ``count`` and ``sum`` meters (with their ``filter``); other aggregations are listed in
    :attr:`unchecked`. Sums are exact: values are ints and Decimals, never floats.
    """

    def __init__(self, meters: Iterable[Meter]):
        meters = list(meters)
        self.meters = [m for m in meters if m.aggregation in ("count", "sum")]
        self.unchecked = [m for m in meters if m not in self.meters]
        self.totals: dict[str, Decimal] = {m.slug: Decimal(0) for m in self.meters}
        self._by_type: dict[str, list[Meter]] = {}
        for m in self.meters:
            self._by_type.setdefault(m.event_type, []).append(m)
        self._seen: set[str] = set()
        self.unique = 0
        self.duplicates = 0

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        """Count accepted events; an id seen before adds nothing (the platform dedups it)."""
        for event in events:
            if event["id"] in self._seen:
                self.duplicates += 1
                continue
            self._seen.add(event["id"])
            self.unique += 1
            properties = event.get("properties") or {}
            for meter in self._by_type.get(event["event_type"], ()):
                if not all(
                    any(_same(property_at(properties, key), v) for v in values)
                    for key, values in meter.filter.items()
                ):
                    continue
                if meter.aggregation == "count":
                    self.totals[meter.slug] += 1
                else:
                    value = property_at(properties, meter.value_property or "")
                    if _numeric(value):  # the platform ignores a missing or non-numeric value in a sum
                        self.totals[meter.slug] += Decimal(value)


# --- sending -----------------------------------------------------------------------------------------


class DemoError(Exception):
    """The demo cannot go on (the gateway refused a request, or stays unreachable)."""


class TokenBucket:
    """Paces requests to ``rate`` events per second; bursts up to ``capacity`` events."""

    def __init__(self, rate: float, capacity: float):
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.last = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until ``n`` events may go out."""
        async with self._lock:  # first come, first served: a big request is not starved by small ones
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


@dataclass
class SendStats:
    """What sending did."""

    requests: int = 0  # HTTP requests, retries included
    retries: int = 0
    accepted: int = 0  # events in 202 answers, re-sends included
    resent: int = 0  # events in re-send requests
    elapsed: float = 0.0


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


async def _post(client: httpx.AsyncClient, body: bytes, count: int, stats: SendStats) -> None:
    """POST one batch until it is accepted; retries reuse the same ids, so they are safe."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        stats.requests += 1
        try:
            response = await client.post(
                "/v1/events", content=body, headers={"content-type": "application/json"}
            )
        except httpx.TransportError as exc:
            if attempt == MAX_ATTEMPTS:
                raise DemoError(f"the gateway stays unreachable ({exc!r})") from exc
            stats.retries += 1
            await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
            continue
        if response.status_code == 202:
            accepted = response.json().get("accepted")
            if accepted != count:
                raise DemoError(f"the gateway accepted {accepted} of {count} events in one request")
            return
        if response.status_code in (502, 503, 504) and attempt < MAX_ATTEMPTS:
            stats.retries += 1
            await asyncio.sleep(_retry_after(response))
            continue
        # A 4xx means the demo sent something the contract refuses: a bug to fix, not to retry.
        raise DemoError(f"POST /v1/events answered {response.status_code}: {response.text}")


async def send_traffic(
    client: httpx.AsyncClient,
    traffic: Traffic,
    expectation: Expectation,
    rate: float | None = None,
    concurrency: int = CONCURRENCY,
    progress: tqdm | None = None,
) -> SendStats:
    """Send every planned request, ``concurrency`` at a time, and feed accepted events to ``expectation``.

    Raises DemoError (after cancelling the requests in flight) when a request is refused.
    """
    stats = SendStats()
    # A burst of one request at most: the rate holds from the first second on.
    bucket = TokenBucket(rate, max(s.count for s in traffic.plan)) if rate else None
    done = {spec.index: asyncio.Event() for spec in traffic.plan}
    specs = iter(traffic.plan)

    async def worker() -> None:
        for spec in specs:  # shared iterator: each request is taken by exactly one worker, in plan order
            if spec.resend_of is not None:
                # A re-send copies a request the gateway has accepted: wait for that 202.
                await done[spec.resend_of].wait()
            if bucket is not None:
                await bucket.take(spec.count)
            events = traffic.events_for(spec)
            await _post(client, encode_events(events), len(events), stats)
            expectation.add(events)
            stats.accepted += len(events)
            if spec.resend_of is not None:
                stats.resent += len(events)
            done[spec.index].set()
            if progress is not None:
                progress.update(len(events))

    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(traffic.plan))):
                group.create_task(worker())
    except* DemoError as errors:
        raise errors.exceptions[0] from None
    finally:
        stats.elapsed = time.monotonic() - started
    return stats


# --- waiting and checking ----------------------------------------------------------------------------


def _decode(response: httpx.Response) -> Any:
    """A JSON answer with every fraction as a Decimal: the comparison never meets a float."""
    return json.loads(response.text, parse_float=Decimal)


async def _get(client: httpx.AsyncClient, path: str, params: dict[str, str] | None = None) -> Any:
    """GET a JSON answer, retrying a few times while the gateway says 503 or is briefly away."""
    for attempt in range(1, 6):
        try:
            response = await client.get(path, params=params)
        except httpx.TransportError as exc:
            if attempt == 5:
                raise DemoError(f"cannot reach the gateway ({exc!r})") from exc
            await asyncio.sleep(1)
            continue
        if response.status_code == 503 and attempt < 5:
            await asyncio.sleep(_retry_after(response))
            continue
        if response.status_code != 200:
            raise DemoError(f"GET {path} answered {response.status_code}: {response.text}")
        return _decode(response)
    raise AssertionError("unreachable")


def _processed(status: dict[str, Any]) -> int:
    events = status["events"]
    if "processed" in events:
        return int(events["processed"])
    return int(events["stored"]) + int(events["duplicates"]) + int(events["quarantined"])


async def wait_for_pipeline(
    client: httpx.AsyncClient, baseline: int, accepted: int, timeout: float = WAIT_TIMEOUT, poll: float = 0.5
) -> bool:
    """Wait until nothing is pending and the ledger grew by at least ``accepted`` events since ``baseline``.

    ``pending == 0`` says the consumer has committed and acked everything in the stream; the ledger's
    growth says this run's events are among what was committed (rather than, say, a stream deleted
    before its events were processed). Returns False on timeout.
    """
    deadline = time.monotonic() + timeout
    with tqdm(total=accepted, desc="counting", unit="ev", unit_scale=True, leave=False) as bar:
        while True:
            try:
                status = await _get(client, "/v1/ingest/status")
            except DemoError:
                status = None  # keep waiting: the gateway or its database may be restarting
            if status is not None:
                processed, pending = _processed(status) - baseline, int(status["consumer"]["pending"])
                bar.n = min(max(processed, 0), accepted)
                bar.set_postfix(pending=pending, refresh=False)
                bar.refresh()
                if pending == 0 and processed >= accepted:
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll)


@dataclass(frozen=True)
class MeterCheck:
    """One meter's expected and counted total for the run's customers."""

    slug: str
    expected: Decimal
    counted: Decimal | None  # None: the gateway could not answer for this meter
    note: str = ""

    @property
    def ok(self) -> bool:
        """True when the platform counted exactly what was sent."""
        return self.counted is not None and self.counted == self.expected


async def usage_for_customers(
    client: httpx.AsyncClient, slug: str, customers: set[str], start: datetime, end: datetime
) -> Decimal:
    """A meter's total over ``[start, end)`` for ``customers`` only, from ``group_by=customer_id`` rows."""
    params = {"from": format_timestamp(start), "to": format_timestamp(end), "group_by": "customer_id"}
    total = Decimal(0)
    while True:
        answer = await _get(client, f"/v1/meters/{slug}/usage", params)
        for row in answer["data"]:
            if row["customer_id"] in customers and row["value"] is not None:
                total += Decimal(row["value"])
        if answer.get("next_offset") is None:
            return total
        params["offset"] = str(answer["next_offset"])


async def check_meters(
    client: httpx.AsyncClient, expectation: Expectation, customers: set[str], start: datetime, end: datetime
) -> list[MeterCheck]:
    """Compare every checked meter's expected total with what the usage API counts for the run."""
    checks = []
    for meter in expectation.meters:
        expected = expectation.totals[meter.slug]
        try:
            counted = await usage_for_customers(client, meter.slug, customers, start, end)
        except DemoError as exc:
            checks.append(MeterCheck(meter.slug, expected, None, str(exc)))
            continue
        checks.append(MeterCheck(meter.slug, expected, counted))
    return checks


# --- the command -------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """Everything a run did and found; ``exit_code`` is what ``meter demo`` returns."""

    exit_code: int
    token: str = ""
    seed: int = 0
    customers: set[str] = field(default_factory=set)
    expectation: Expectation | None = None
    stats: SendStats | None = None
    started: datetime | None = None
    checks: list[MeterCheck] = field(default_factory=list)


def _fmt(value: Decimal | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}"


def print_checks(checks: list[MeterCheck], unchecked: list[Meter], out: TextIO) -> None:
    """The table of expected against counted totals."""
    width = max([len("meter"), *(len(c.slug) for c in checks)])
    rows = [(c.slug, _fmt(c.expected), _fmt(c.counted), "✓" if c.ok else "✗", c.note) for c in checks]
    exp_w = max([len("expected"), *(len(r[1]) for r in rows)])
    cnt_w = max([len("counted"), *(len(r[2]) for r in rows)])
    print(f"{'meter':<{width}}  {'expected':>{exp_w}}  {'counted':>{cnt_w}}", file=out)
    for slug, expected, counted, mark, note in rows:
        line = f"{slug:<{width}}  {expected:>{exp_w}}  {counted:>{cnt_w}}  {mark}"
        print(f"{line}  {note}" if note else line, file=out)
    for meter in unchecked:
        print(f"{meter.slug:<{width}}  (not checked: the demo computes count and sum meters only)", file=out)


async def _demo(
    gateway_url: str,
    catalog: Catalog,
    events: int,
    batch_size: int,
    rate: float | None,
    seed: int,
    wait: bool,
    wait_timeout: float,
    out: TextIO,
) -> DemoResult:
    token = secrets.token_hex(4)
    generator = TrafficGenerator(token, seed)
    traffic = Traffic(generator, plan_requests(events, batch_size, random.Random(f"{seed}:plan")))
    expectation = Expectation(catalog.meters)
    result = DemoResult(EXIT_ERROR, token, seed, generator.customer_ids, expectation)
    missing = [t for t in EVENT_TYPES if t not in catalog.event_types]
    if missing and not catalog.accept_unknown_event_types:
        print(
            f"warning: the catalog declares no {', '.join(missing)}; those events will be quarantined",
            file=out,
        )

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    timeout = httpx.Timeout(60.0, connect=5.0)
    async with httpx.AsyncClient(base_url=gateway_url, limits=limits, timeout=timeout) as client:
        try:
            # Also the check that the gateway is there at all, before a long run of retries.
            baseline = _processed(await _get(client, "/v1/ingest/status")) if wait else 0
            if not wait:
                await _get(client, "/healthz")
        except DemoError as exc:
            print(f"meter demo: {exc}; is `meter up` running at {gateway_url}?", file=sys.stderr)
            return result
        pace = f"{rate:,.0f} events/s" if rate else "as fast as possible"
        print(
            f"run {token} (seed {seed}): {events:,} events from {len(generator.customers)} customers, "
            f"{len(traffic.plan)} requests of up to {batch_size} events, {CONCURRENCY} in flight, {pace}"
            f" -> {gateway_url}",
            file=out,
        )
        result.started = datetime.now(UTC)
        with tqdm(total=traffic.total_events, desc="sending", unit="ev", unit_scale=True) as bar:
            try:
                stats = await send_traffic(client, traffic, expectation, rate, progress=bar)
            except DemoError as exc:
                bar.close()
                print(f"meter demo: stopped: {exc}", file=sys.stderr)
                return result
        result.stats = stats
        per_second = stats.accepted / stats.elapsed if stats.elapsed else float("inf")
        print(
            f"sent     {stats.accepted:,} events in {stats.requests:,} requests ({stats.retries} retried)\n"
            f"accepted {stats.accepted:,} = {expectation.unique:,} unique + {stats.resent:,} re-sent unchanged\n"
            f"elapsed  {stats.elapsed:.2f} s, {per_second:,.0f} events/s",
            file=out,
        )
        if not wait:
            print("not waiting for the pipeline (--no-wait); `meter status` shows its progress", file=out)
            result.exit_code = EXIT_MATCH
            return result

        print("waiting for the pipeline to count them ...", file=out)
        waited = time.monotonic()
        if not await wait_for_pipeline(client, baseline, stats.accepted, wait_timeout):
            print(
                f"gave up after {wait_timeout:.0f} s: the pipeline has not processed this run's events yet. "
                "Is the Dagster daemon running (`meter up` starts it)? `meter status` shows the backlog.",
                file=out,
            )
            result.exit_code = EXIT_MISMATCH
            return result
        print(f"counted in {time.monotonic() - waited:.1f} s after the last 202", file=out)
        now = datetime.now(UTC)
        result.checks = await check_meters(
            client, expectation, result.customers, result.started - QUERY_MARGIN, now + QUERY_MARGIN
        )
    print_checks(result.checks, expectation.unchecked, out)
    if all(c.ok for c in result.checks):
        print(
            f"all {len(result.checks)} meters match: {expectation.unique:,} events counted once each, "
            f"{expectation.duplicates:,} re-sent events not counted again",
            file=out,
        )
        result.exit_code = EXIT_MATCH
    else:
        bad = sum(not c.ok for c in result.checks)
        print(f"{bad} of {len(result.checks)} meters do not match what was sent", file=out)
        result.exit_code = EXIT_MISMATCH
    return result


def run_demo(
    gateway_url: str,
    events: int = 10_000,
    batch_size: int = 500,
    rate: float | None = None,
    seed: int | None = None,
    wait: bool = True,
    wait_timeout: float = WAIT_TIMEOUT,
    catalog: Catalog | None = None,
    out: TextIO | None = None,
) -> DemoResult:
    """Send the demo traffic to ``gateway_url`` and, when ``wait``, check every meter's total.

    ``catalog`` defaults to the one in ``METER_CATALOG_DIR``; it must be the gateway's. Exit codes:
    0 all meters match (or not waiting), 1 a mismatch or the pipeline did not finish in time,
    2 the demo could not send (gateway unreachable or refusing the requests).
    """
    out = out or sys.stdout
    if events < 1 or batch_size < 1 or (rate is not None and rate <= 0):
        print("meter demo: --events and --batch-size must be at least 1, --rate above 0", file=sys.stderr)
        return DemoResult(EXIT_ERROR)
    if catalog is None:
        from meter_platform.catalog import load_catalog
        from meter_platform.config import load_settings

        catalog = load_catalog(load_settings().catalog_dir)
    # A seed is always used (and shown), so any run can be repeated with --seed.
    seed = seed if seed is not None else random.SystemRandom().randrange(1_000_000)
    return asyncio.run(_demo(gateway_url, catalog, events, batch_size, rate, seed, wait, wait_timeout, out))


def run(args: argparse.Namespace, gateway_url: str) -> int:
    """``meter demo``: the CLI entry point; returns the exit code."""
    return run_demo(
        gateway_url,
        events=args.events,
        batch_size=args.batch_size,
        rate=args.rate,
        seed=args.seed,
        wait=not args.no_wait,
        wait_timeout=getattr(args, "wait_timeout", WAIT_TIMEOUT),
    ).exit_code
