"""Waiting for the pipeline to count a run's events, and comparing every meter's total with the expectation."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO

import httpx
from tqdm import tqdm

from meter_platform.capture.envelope import format_timestamp
from meter_platform.catalog import Meter
from meter_platform.cli.demo.expectation import Expectation
from meter_platform.cli.demo.send import DemoError
from meter_platform.sdk.retry import parse_retry_after

#: How long to wait for the pipeline to count the run's events before giving up.
WAIT_TIMEOUT = 300.0
#: Usage queries cover the run with this margin on each side (timestamps carry jitter; clocks drift).
QUERY_MARGIN = timedelta(minutes=5)


def _decode(response: httpx.Response) -> Any:
    """A JSON answer with every fraction as a Decimal: the comparison never meets a float."""
    return json.loads(response.text, parse_float=Decimal)


async def get_json(client: httpx.AsyncClient, path: str, params: dict[str, str] | None = None) -> Any:
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
            await asyncio.sleep(parse_retry_after(response.headers.get("retry-after")) or 1.0)
            continue
        if response.status_code != 200:
            raise DemoError(f"GET {path} answered {response.status_code}: {response.text}")
        return _decode(response)
    raise AssertionError("unreachable")


def processed_total(status: dict[str, Any]) -> int:
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
                status = await get_json(client, "/v1/ingest/status")
            except DemoError:
                status = None  # keep waiting: the gateway or its database may be restarting
            if status is not None:
                processed, pending = processed_total(status) - baseline, int(status["consumer"]["pending"])
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
        answer = await get_json(client, f"/v1/meters/{slug}/usage", params)
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
