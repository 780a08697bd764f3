"""The SDK in a minute: track a few events, flush, and read the usage back.

Start the platform first (``make up``), then, from the same directory:

    .venv/bin/python docs/examples/sdk_quickstart.py [GATEWAY_URL]

The API key comes from ``METER_API_KEY``, else from ``.meter/api-key`` (``make up`` writes it there).
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta

from meter_platform.sdk import MeterClient

GATEWAY = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
CUSTOMER = "cust_quickstart"


def main() -> int:
    started = datetime.now(UTC)
    with MeterClient(GATEWAY) as meter:
        ids = []
        for endpoint, method in [("/v1/users", "GET"), ("/v1/users", "POST"), ("/v1/orders", "GET")]:
            ids.append(
                meter.track(
                    "api_call",
                    CUSTOMER,
                    {
                        "endpoint": endpoint,
                        "method": method,
                        "region": "eu-west-1",
                        "bytes_transferred": 2048,
                    },
                    metadata={"user_agent": "sdk-quickstart/1.0"},
                )
            )
        meter.flush()  # the 202 came: the events are durable in JetStream
        print(f"tracked {len(ids)} events: {', '.join(ids)}")

        # The pipeline counts them within seconds (the first run after a quiet spell takes ~20 s).
        deadline = time.monotonic() + 120
        while any((e := meter.event(i)) is None or e.state == "pending" for i in ids):
            if time.monotonic() > deadline:
                print("the pipeline has not counted them yet: is the Dagster daemon running?")
                return 1
            time.sleep(1)

        usage = meter.usage(
            "api_calls",
            customer_id=CUSTOMER,
            from_=started - timedelta(minutes=1),
            to=datetime.now(UTC) + timedelta(minutes=1),
            group_by=["endpoint", "method"],
        )
        print(f"{usage.meter} for {CUSTOMER} since {started:%H:%M:%S} UTC:")
        for row in usage.data:
            print(f"  {row.group['endpoint']:<12} {row.group['method']:<5} {row.value}")
        print(f"  total {usage.total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
