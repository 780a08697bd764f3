"""The meter platform's Python SDK: send usage events reliably, read usage, events and invoices back.

```python
from meter_platform.sdk import MeterClient

with MeterClient("http://127.0.0.1:8080") as meter:   # key: METER_API_KEY, else .meter/api-key
    event_id = meter.track("api_call", "cust_123", {"endpoint": "/v1/users", "method": "GET"})
    meter.flush()                                       # durable in JetStream once this returns
    print(meter.event(event_id))                        # state pending, then stored
    print(meter.usage("api_calls", customer_id="cust_123").total)
```

See ``docs/examples/sdk_quickstart.py``.

It depends only on the standard library, httpx and msgspec (``tests/sdk/test_isolation.py`` holds
it so), so it can ship as its own distribution.
"""

from meter_platform.sdk.async_client import AsyncMeterClient
from meter_platform.sdk.client import MeterClient
from meter_platform.sdk.core import resolve_api_key
from meter_platform.sdk.errors import (
    ApiError,
    AuthenticationError,
    BufferFull,
    ClientClosed,
    DeliveryError,
    InvalidRequest,
    MeterError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    RejectedEvents,
    Rejection,
    Unavailable,
)
from meter_platform.sdk.events import format_timestamp, uuid7
from meter_platform.sdk.models import (
    Accepted,
    ConsumerStatus,
    EventTotals,
    IngestStatus,
    Invoice,
    InvoiceLine,
    ItemError,
    Meter,
    StoredEvent,
    StreamStatus,
    Usage,
    UsageRow,
)
from meter_platform.sdk.retry import RequestStats, RetryPolicy

__all__ = [
    "Accepted",
    "ApiError",
    "AsyncMeterClient",
    "AuthenticationError",
    "BufferFull",
    "ClientClosed",
    "ConsumerStatus",
    "DeliveryError",
    "EventTotals",
    "IngestStatus",
    "InvalidRequest",
    "Invoice",
    "InvoiceLine",
    "ItemError",
    "Meter",
    "MeterClient",
    "MeterError",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "RejectedEvents",
    "Rejection",
    "RequestStats",
    "RetryPolicy",
    "StoredEvent",
    "StreamStatus",
    "Unavailable",
    "Usage",
    "UsageRow",
    "format_timestamp",
    "resolve_api_key",
    "uuid7",
]
