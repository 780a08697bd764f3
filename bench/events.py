"""The benchmark's load: unique, realistic ``api_call`` events, built cheaply from string templates."""

from __future__ import annotations

import time
from datetime import UTC, datetime

# (endpoint, method) pairs a customer's integration calls; each customer uses a handful of them.
_CALLS = [
    ("/v1/users", "GET"),
    ("/v1/users", "POST"),
    ("/v1/orders", "GET"),
    ("/v1/orders", "POST"),
    ("/v1/orders/{id}", "PATCH"),
    ("/v1/search", "GET"),
    ("/v1/payments", "POST"),
    ("/v1/files/{id}", "PUT"),
    ("/v1/files/{id}", "DELETE"),
    ("/v1/reports", "GET"),
]
_REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-1"]
CUSTOMERS = 1000


def utc_stamp(dt: datetime) -> str:
    """RFC 3339 with microseconds and Z, as senders usually stamp their events."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventFactory:
    """Unique, valid ``api_call`` events like the contract's example (1000 customers, 10 calls, 5 regions).

    Bodies are built from string templates, not dicts and a JSON encoder: the load generator shares
    the CPU with what it measures, so it has to be cheap (a few µs an event).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.n = 0
        self._seconds: dict[int, str] = {}

    def _stamp(self, us: int) -> str:
        sec, frac = divmod(us, 1_000_000)
        head = self._seconds.get(sec)
        if head is None:
            if len(self._seconds) > 8:
                self._seconds.clear()
            head = self._seconds[sec] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{head}.{frac:06d}Z"

    def body(self, count: int, probe_customer: str | None = None) -> tuple[bytes, str]:
        """JSON of ``count`` new events (an array, or one object when ``count`` is 1) and the first id.

        Each event has its own time, as an SDK stamps them when they happen (the last few ms); the
        first one gets ``probe_customer`` as its customer when given.
        """
        now = time.time_ns() // 1000
        items = []
        first = f"{self.prefix}-{self.n:010d}"
        for i in range(count):
            n = self.n
            self.n += 1
            mix = (n * 2654435761) & 0xFFFFFFFF
            c = mix % CUSTOMERS
            customer = probe_customer if (i == 0 and probe_customer) else f"cust-{c:04d}"
            endpoint, method = _CALLS[(c + (mix >> 12) % 4) % len(_CALLS)]
            items.append(
                f'{{"id":"{self.prefix}-{n:010d}","event_type":"api_call","customer_id":"{customer}",'
                f'"timestamp":"{self._stamp(now - (count - i) * 137)}","properties":{{"endpoint":"{endpoint}",'
                f'"method":"{method}","region":"{_REGIONS[c % len(_REGIONS)]}",'
                f'"response_time_ms":{5 + (mix >> 8) % 400}.25,"bytes_transferred":{200 + (mix >> 4) % 65_000}}},'
                '"metadata":{"sdk":"bench/1.0"}}'
            )
        text = items[0] if count == 1 else "[" + ",".join(items) + "]"
        return text.encode(), first
