"""Usage answers are exact: random events (resends, out of order, across DST changes) are written
through the real pipeline into PostgreSQL, and every query — each aggregation, window, zone, grouping,
customer filter and unaligned range — is compared with a reference computed in plain Python."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_platform.capture.envelope import (
    Event,
    GatewayBatch,
    datetime_to_us,
    encode_batch,
    format_timestamp,
)
from meter_platform.capture.messages import Message
from meter_platform.catalog import Meter, load_catalog
from meter_platform.config import BATCH_HEADER, GATEWAY_SUBJECT
from meter_platform.ingestion.writer import MicroBatchWriter
from meter_platform.meters.aggregates import psycopg_bind
from meter_platform.meters.rebuild import sync_meters
from meter_platform.meters.usage import UsageQuery, usage_sql
from meter_platform.storage import db
from tests.conftest import TABLES

CATALOG = load_catalog(Path(__file__).parent / "catalogs" / "all_aggregations")
# Two bases, each spanning a DST change in Europe and North America (and none in Asia/Kolkata).
BASES = [datetime(2026, 10, 24, 20, tzinfo=UTC), datetime(2026, 3, 28, 20, tzinfo=UTC)]
SPAN_US = 3 * 24 * 3600 * 1_000_000 + 7_777_777
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]


@dataclass(frozen=True)
class Ev:
    id: str
    customer: str
    offset_us: int
    region: str | None
    tier: str | None
    amount: float | int | None
    user: str | None
    tokens: int | None

    def event(self, base: datetime) -> Event:
        props: dict[str, Any] = {}
        for key in ("region", "tier", "amount", "user"):
            if getattr(self, key) is not None:
                props[key] = getattr(self, key)
        if self.tokens is not None:
            props["usage"] = {"tokens": self.tokens}
        ts = base + timedelta(microseconds=self.offset_us)
        return Event(
            event_type="request",
            customer_id=self.customer,
            id=self.id,
            timestamp=format_timestamp(ts),
            properties=props,
        )


amounts = st.one_of(
    st.none(),
    st.integers(-1000, 1000),
    st.decimals(-1000, 1000, places=2, allow_nan=False, allow_infinity=False).map(float),
)
events = st.builds(
    Ev,
    id=st.integers(0, 40).map(lambda n: f"e{n}"),  # a small pool: resends happen often
    customer=st.sampled_from(["c1", "c2", "c3"]),
    offset_us=st.one_of(
        st.integers(0, SPAN_US),
        # land near DST changes and window edges more often
        st.sampled_from([0, 60_000_000, 3_600_000_000, 17 * 3600 * 1_000_000, 29 * 3600 * 1_000_000 + 1]),
    ),
    region=st.sampled_from(["eu", "us", "ap", None]),
    tier=st.sampled_from(["free", "pro", None]),
    amount=amounts,
    user=st.sampled_from(["u1", "u2", "u3", "u4", None]),
    tokens=st.one_of(st.none(), st.integers(0, 10_000)),
)


@dataclass(frozen=True)
class Q:
    slug: str
    window: str | None
    tz: str
    start_us: int
    length_us: int
    group_by: tuple[str, ...]
    customer: str | None


def _query_strategy() -> st.SearchStrategy[Q]:
    def for_meter(meter: Meter) -> st.SearchStrategy[Q]:
        return st.builds(
            Q,
            slug=st.just(meter.slug),
            window=st.sampled_from([None, "minute", "hour", "day", "month"]),
            tz=st.sampled_from(ZONES),
            start_us=st.one_of(st.integers(-3_600_000_000, SPAN_US), st.sampled_from([-1, 0, 60_000_000])),
            length_us=st.one_of(
                st.integers(1, SPAN_US), st.sampled_from([60_000_000, 86_400_000_000, SPAN_US + 2])
            ),
            group_by=st.lists(st.sampled_from(meter.dimensions), unique=True, max_size=3).map(tuple),
            customer=st.sampled_from([None, "c1", "c2"]),
        )

    return st.sampled_from(CATALOG.meters).flatmap(for_meter)


# --- the reference: plain Python over the list of events as sent ----------------------------------


def _lookup(props: dict[str, Any], path: str) -> Any:
    value: Any = props
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


def _bucket(ts: datetime, window: str | None, zone: ZoneInfo, start: datetime, end: datetime):
    if window is None:
        return start, end
    local = ts.astimezone(zone)
    if window == "minute":
        b = local.replace(second=0, microsecond=0)
        return b.astimezone(UTC), b.astimezone(UTC) + timedelta(minutes=1)
    if window == "hour":
        b = local.replace(minute=0, second=0, microsecond=0)
        return b.astimezone(UTC), b.astimezone(UTC) + timedelta(hours=1)
    if window == "day":
        b = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
        nxt = (b.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=zone)
        return b.astimezone(UTC), nxt.astimezone(UTC)
    b = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0, fold=0)
    nxt = b.replace(year=b.year + (b.month == 12), month=b.month % 12 + 1)
    return b.astimezone(UTC), nxt.astimezone(UTC)


def reference(stored: list[tuple[Ev, Event]], meter: Meter, q: Q, base: datetime) -> dict[tuple, Any]:
    start = base + timedelta(microseconds=q.start_us)
    end = start + timedelta(microseconds=q.length_us)
    zone = ZoneInfo(q.tz)
    groups: dict[tuple, list[tuple[datetime, str, Any]]] = defaultdict(list)
    for ev, event in stored:
        ts = base + timedelta(microseconds=ev.offset_us)
        props = event.properties
        if not start <= ts < end or (q.customer and ev.customer != q.customer):
            continue
        if any(_text(_lookup(props, k)) not in [_text(v) for v in vals] for k, vals in meter.filter.items()):
            continue
        b_start, b_end = _bucket(ts, q.window, zone, start, end)
        key = (
            max(b_start, start),
            min(b_end, end),
            ev.customer if ("customer_id" in q.group_by or q.customer) else None,
            *(_text(_lookup(props, g)) for g in q.group_by if g != "customer_id"),
        )
        raw = _lookup(props, meter.value_property) if meter.value_property else None
        groups[key].append((ts, ev.id, raw))
    out: dict[tuple, Any] = {}
    for key, items in groups.items():
        numbers = [
            Decimal(str(v)) for _, _, v in items if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        agg = meter.aggregation
        if agg == "count":
            out[key] = Decimal(len(items))
        elif agg == "sum":
            out[key] = sum(numbers) if numbers else None
        elif agg == "min":
            out[key] = min(numbers) if numbers else None
        elif agg == "max":
            out[key] = max(numbers) if numbers else None
        elif agg == "avg":
            out[key] = (sum(numbers) / len(numbers)).quantize(Decimal("1e-12")) if numbers else None
        elif agg == "unique_count":
            out[key] = Decimal(len({_text(v) for _, _, v in items if v is not None}))
        else:  # latest: the value of the newest event carrying one (ties: the greater id)
            with_value = [(ts, i, Decimal(str(v))) for ts, i, v in items if isinstance(v, int | float)]
            out[key] = max(with_value)[2] if with_value else None
    return out


# --- the system under test --------------------------------------------------------------------------


def _write(database_url: str, base: datetime, evs: list[Ev], chunk: int) -> list[tuple[Ev, Event]]:
    """Send the events through the micro-batch writer in chunks (arrival order = list order)."""
    writer = MicroBatchWriter(CATALOG, database_url)
    received = datetime_to_us(base + timedelta(days=4))
    messages = []
    for seq, i in enumerate(range(0, len(evs), chunk), 1):
        batch = GatewayBatch(received_at=received, events=[e.event(base) for e in evs[i : i + chunk]])
        messages.append(Message(seq, GATEWAY_SUBJECT, encode_batch(batch), {BATCH_HEADER: "1"}, received))
    try:
        for n in range(0, len(messages), 3):  # several micro-batches
            counts = writer.write(messages[n : n + 3])
            assert counts.balanced and counts.quarantined == 0
    finally:
        writer.close()
    first: dict[str, tuple[Ev, Event]] = {}
    for ev in evs:
        first.setdefault(ev.id, (ev, ev.event(base)))
    return list(first.values())


def _answer(conn, meter: Meter, q: Q, base: datetime) -> dict[tuple, Any]:
    start = base + timedelta(microseconds=q.start_us)
    uq = UsageQuery(
        meter, start, start + timedelta(microseconds=q.length_us), q.window, q.tz, q.group_by, q.customer
    )
    sql, params = usage_sql(uq, psycopg_bind)
    out = {}
    n_groups = 1 + len([g for g in q.group_by if g != "customer_id"])
    for row in conn.execute(sql, params).fetchall():
        key = (row[0], row[1], *row[2 : 2 + n_groups])
        value = row[2 + n_groups]
        if meter.aggregation == "avg" and value is not None:
            value = value.quantize(Decimal("1e-12"))
        if meter.aggregation in ("count", "unique_count") and value is not None:
            value = Decimal(value)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def exact_db(database_url: str) -> str:
    """The session database, reserved for this module's examples."""
    return database_url


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    evs=st.lists(events, min_size=1, max_size=80),
    queries=st.lists(_query_strategy(), min_size=1, max_size=10),
    chunk=st.integers(1, 25),
    base=st.sampled_from(BASES),
)
def test_every_usage_answer_equals_the_reference(exact_db, evs, queries, chunk, base):
    with db.connect(exact_db, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        sync_meters(conn, CATALOG)
    stored = _write(exact_db, base, evs, chunk)
    with db.connect(exact_db) as conn:
        for q in queries:
            meter = CATALOG.meter(q.slug)
            assert meter is not None
            assert _answer(conn, meter, q, base) == reference(stored, meter, q, base), q


def test_meter_change_replays_history_and_reports_old_against_new(database_url):
    base = BASES[0]
    with db.connect(database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        sync_meters(conn, CATALOG)
    evs = [
        Ev("a", "c1", 0, "eu", "pro", 10, "u1", 5),
        Ev("b", "c1", 90_000_000, "us", "free", 2.5, "u2", None),
        Ev("c", "c2", 3_600_000_000, "eu", "pro", 7, "u1", 1),
        Ev("a", "c1", 5, "ap", "free", 999, None, None),  # a resend: ignored
    ]
    _write(database_url, base, evs, 2)
    # The catalog changes: amount_sum now only counts the eu region, and a new meter appears.
    changed = CATALOG.meter("amount_sum")
    assert changed is not None
    from dataclasses import replace

    from meter_platform.catalog import Catalog

    new_catalog = Catalog(
        meters=(
            *[m for m in CATALOG.meters if m.slug != "amount_sum"],
            replace(changed, filter={"region": ("eu",)}),
            Meter("users_per_tier", "request", "unique_count", "user", ("tier",)),
        ),
        event_types=CATALOG.event_types,
    )
    with db.connect(database_url, autocommit=True) as conn:
        reports = {r.slug: r for r in sync_meters(conn, new_catalog)}
        assert set(reports) == {"amount_sum", "users_per_tier"}
        assert reports["amount_sum"].kind == "changed"
        assert reports["amount_sum"].changed_customers == {"c1": (Decimal("12.5"), Decimal(10))}
        assert reports["users_per_tier"].kind == "added"
        assert reports["users_per_tier"].customers == {"c1": (None, 2), "c2": (None, 1)}
        rows = conn.execute("SELECT slug, kind FROM meter_replays ORDER BY replay_id DESC LIMIT 2").fetchall()
        assert sorted(rows) == [("amount_sum", "changed"), ("users_per_tier", "added")]
        # Nothing pending any more, and the aggregates equal a fresh computation with the new definition.
        assert sync_meters(conn, new_catalog) == []
        total = conn.execute(
            "SELECT sum(value_sum) FROM usage_minute_aggregates WHERE meter_slug = 'amount_sum'"
        ).fetchone()
        assert total == (Decimal(17),)
