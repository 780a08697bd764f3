"""Capture: how fast events get into JetStream, through the gateway and published directly."""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from dataclasses import dataclass, field

import httpx
from clients import LoadClient, count_error
from events import EventFactory
from report import fmt_cpu, fmt_ms, pct, say
from stack import CpuMeter, Stack, purge_stream

from meter_platform.capture import jetstream
from meter_platform.config import EVENTS_SUBJECT_PREFIX


@dataclass
class Result:
    """One capture measurement."""

    name: str
    events: int = 0
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def eps(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Window:
    """Which completions count: duration mode skips a warm-up and stops at a deadline; events mode
    counts everything from the first send until ``events`` are acknowledged."""

    def __init__(self, duration: float, warmup: float, events: int | None):
        self.events = events
        self.start = time.perf_counter()
        self.measure_from = self.start + (0 if events else warmup)
        self.deadline = None if events else self.measure_from + duration
        self.claimed = 0
        self.records: list[tuple[float, float, int]] = []  # (done, latency, events)

    def claim(self, n: int) -> bool:
        """May another request of ``n`` events be sent?"""
        if self.events is not None:
            if self.claimed >= self.events:
                return False
            self.claimed += n
            return True
        assert self.deadline is not None
        return time.perf_counter() < self.deadline

    def result(self, name: str) -> Result:
        if self.events is not None:
            counted = self.records
            seconds = (max(r[0] for r in counted) - self.start) if counted else 0.0
        else:
            assert self.deadline is not None
            counted = [r for r in self.records if self.measure_from <= r[0] <= self.deadline]
            seconds = self.deadline - self.measure_from
        return Result(name, sum(r[2] for r in counted), len(counted), seconds, [r[1] for r in counted])


async def capture_gateway(
    stack: Stack, args: argparse.Namespace, factory: EventFactory, batch: int
) -> Result:
    """``concurrency`` clients POST /v1/events as fast as the gateway answers."""
    errors: dict[str, int] = {}
    async with LoadClient(stack.gateway_url, args.concurrency, args.client, stack.api_key) as client:
        cpu = CpuMeter(stack)
        cpu.start()
        win = Window(args.duration, args.warmup, args.events)

        async def worker(w: int) -> None:
            while win.claim(batch):
                body, _ = factory.body(batch)
                t0 = time.perf_counter()
                try:
                    status = await client.post(w, body)
                except (OSError, httpx.HTTPError, asyncio.IncompleteReadError) as exc:
                    count_error(errors, type(exc).__name__)
                    return
                t1 = time.perf_counter()
                if status == 202:
                    win.records.append((t1, t1 - t0, batch))
                else:
                    count_error(errors, str(status))

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        shape = f"batch of {batch}" if batch > 1 else "single event"
        result = win.result(f"gateway, {shape}")
        result.cpu = cpu.stop()
    result.errors = errors
    return result


async def capture_direct(stack: Stack, args: argparse.Namespace, factory: EventFactory, batch: int) -> Result:
    """The same events published straight to JetStream, ``concurrency`` publishes in flight."""
    assert stack.nats is not None
    errors: dict[str, int] = {}
    nc = await jetstream.connect(stack.nats.url, name="bench-direct")
    try:
        js = nc.jetstream(publish_async_max_pending=args.concurrency)
        subject = f"{EVENTS_SUBJECT_PREFIX}.api_call"
        await js.publish(subject, factory.body(1)[0])  # warm: inbox, subscription
        await purge_stream(stack.nats.url)
        cpu = CpuMeter(stack)
        cpu.start()
        win = Window(args.duration, args.warmup, args.events)

        def done(fut: asyncio.Future, *, t0: float) -> None:
            t1 = time.perf_counter()
            if fut.cancelled():
                count_error(errors, "cancelled")
            elif fut.exception() is not None:
                count_error(errors, type(fut.exception()).__name__)
            else:
                win.records.append((t1, t1 - t0, batch))

        k = 0
        while win.claim(batch):
            payload, first_id = factory.body(batch)
            msg_id = f"{factory.prefix}-m{k}" if batch > 1 else first_id
            k += 1
            t0 = time.perf_counter()
            fut = await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id})
            fut.add_done_callback(functools.partial(done, t0=t0))
        await asyncio.wait_for(js.publish_async_completed(), 60)
        shape = f"batch of {batch}" if batch > 1 else "single event"
        result = win.result(f"direct JetStream, {shape}")
        result.cpu = cpu.stop()
    finally:
        await nc.close()
    result.errors = errors
    return result


def _per_unit(result: Result, path: str, batch: int) -> str:
    """The gateway's CPU per event (batches) or per request (single events): steadier than the rates
    on a machine shared with other work, which slows the gateway and its load alike."""
    count = result.eps if batch > 1 else result.rps
    if path != "gateway" or not count or "gateway" not in result.cpu:
        return ""
    return f", gateway {result.cpu['gateway'] * 1e4 / count:,.1f} us CPU per {'event' if batch > 1 else 'request'}"


async def run_capture(stack: Stack, args: argparse.Namespace, factory: EventFactory) -> list[Result]:
    assert stack.nats is not None
    results = []
    plan = [("gateway", args.batch_size), ("direct", args.batch_size), ("gateway", 1), ("direct", 1)]
    for path, batch in plan:
        await purge_stream(stack.nats.url)
        run = capture_gateway if path == "gateway" else capture_direct
        result = await run(stack, args, factory, batch)
        say(
            f"{result.name}: {result.eps:,.0f} events/s, {result.rps:,.0f} req/s, p50 "
            f"{fmt_ms(pct(result.latencies, 50))} ms, p99 {fmt_ms(pct(result.latencies, 99))} ms, "
            f"CPU {fmt_cpu(result.cpu)}{_per_unit(result, path, batch)}"
        )
        results.append(result)
    await purge_stream(stack.nats.url)  # the end-to-end phase starts from an empty stream
    return results
