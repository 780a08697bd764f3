"""What the benchmark prints: progress lines, the machine's facts, and the capture and end-to-end tables."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from meter_platform.runtime.servers import nats_server_binary
from meter_platform.storage import db

if TYPE_CHECKING:
    from capture import Result
    from e2e import E2EResult
    from stack import Stack


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def fmt_ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"


def fmt_cpu(cpu: dict[str, float]) -> str:
    order = ("client", "gateway", "nats", "postgres", "drain", "other")
    return " ".join(f"{k}={cpu[k]:.0f}%" for k in order if k in cpu and cpu[k] == cpu[k])


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def machine_facts(stack: Stack) -> list[str]:
    facts = []
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts.append(f"CPUs: {os.cpu_count()} ({usable} usable) {model}")
    facts.append(
        f"Python {platform.python_version()} ({platform.python_implementation()}), {platform.platform()}"
    )
    nats_version = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True
    ).stdout.strip()
    facts.append(f"nats-server: {nats_version} (JetStream file store, sync_interval: always)")
    if stack.pg is not None:
        with db.connect(stack.pg.url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            facts.append(f"PostgreSQL {row[0] if row else '?'}")
    from importlib.metadata import version

    libs = ", ".join(
        f"{n} {version(n)}" for n in ("uvicorn", "starlette", "httpx", "nats-py", "msgspec", "psycopg")
    )
    facts.append(f"libraries: {libs}")
    if stack.tmp is not None:
        facts.append(
            f"temp dir {stack.tmp.parent} on {_filesystem(stack.tmp)}, fsync of 4 KiB: "
            f"p50 {fmt_ms(_fsync_p50(stack.tmp))} ms"
        )
    return facts


def _filesystem(path: Path) -> str:
    best, fstype, dev = "", "?", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, dev, fstype = parts[1], parts[0], parts[2]
    return f"{fstype} ({dev})"


def _fsync_p50(directory: Path) -> float:
    path = directory / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(50):
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return pct(times, 50)


def print_capture(results: list[Result], args: argparse.Namespace) -> None:
    print()
    print(
        f"CAPTURE  ({args.concurrency} concurrent clients/publishes in flight; "
        + (
            f"{args.events} events each"
            if args.events
            else f"{args.duration:.0f} s each after {args.warmup:.0f} s warm-up"
        )
        + ")"
    )
    head = (
        f"{'path, shape':34} {'events/s':>10} {'req|msg/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7}  CPU (% of one core)"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        errors = sum(r.errors.values())
        print(
            f"{r.name:34} {r.eps:10,.0f} {r.rps:10,.0f} {fmt_ms(pct(r.latencies, 50)):>8} "
            f"{fmt_ms(pct(r.latencies, 95)):>8} {fmt_ms(pct(r.latencies, 99)):>8} {errors:>7}  {fmt_cpu(r.cpu)}"
        )
        if r.errors:
            print(f"{'':34} errors: {r.errors}")
    by_name = {r.name: r for r in results}
    for shape in (f"batch of {args.batch_size}", "single event"):
        gw, direct = by_name.get(f"gateway, {shape}"), by_name.get(f"direct JetStream, {shape}")
        if gw and direct and direct.eps:
            print(f"ratio gateway / direct, {shape}: {gw.eps / direct.eps:.2f}")


def print_e2e(stages: list[E2EResult], args: argparse.Namespace) -> None:
    print()
    print(
        f"END TO END  (gateway -> JetStream -> drain() in its own process -> PostgreSQL; batches of "
        f"{args.batch_size}, {args.concurrency} clients, drain batch {args.drain_batch} messages)"
    )
    head = (
        f"{'stage':22} {'sent ev/s':>10} {'agg ev/s':>10} {'e2e ev/s':>10} {'max backlog':>12} "
        f"{'fresh p50':>10} {'fresh p95':>10} {'fresh max':>10} {'POST p50':>9} {'POST p99':>9}"
    )
    print(head)
    print("-" * len(head))
    for s in stages:
        target = f" @{s.target_rate:,.0f}/s" if s.target_rate else ""
        print(
            f"{(s.name + target):22} {s.send_eps:10,.0f} {s.visible_eps_during_send:10,.0f} "
            f"{(f'{s.e2e_eps:,.0f}' if s.caught_up else 'not caught up'):>10} {s.max_backlog:12,} "
            f"{fmt_ms(pct(s.freshness, 50)):>10} {fmt_ms(pct(s.freshness, 95)):>10} "
            f"{fmt_ms(max(s.freshness) if s.freshness else float('nan')):>10} "
            f"{fmt_ms(pct(s.latencies, 50)):>9} {fmt_ms(pct(s.latencies, 99)):>9}"
        )
    for s in stages:
        d = s.drain
        per_batch = (
            f"{d.get('events', 0) / d['batches']:.0f} events/batch" if d.get("batches") else "no batches"
        )
        write_rate = d.get("events", 0) / d["write_seconds"] if d.get("write_seconds") else 0.0
        print(
            f"  {s.name}: {s.accepted:,} events accepted in {s.send_seconds:.1f} s, all visible after "
            f"{s.total_seconds:.1f} s; {len(s.freshness)} probes ({s.probes_lost} not seen); drain: "
            f"{d.get('batches', 0):.0f} batches, {per_batch}, writer busy {d.get('write_seconds', 0):.1f} s "
            f"({write_rate:,.0f} events/s while writing); CPU {fmt_cpu(s.cpu)}; peak RSS "
            + ", ".join(f"{n} {mb:,.0f} MiB" for n, mb in s.peak_rss_mb.items())
            + " (targets: gateway <= 200, drain <= 1024)"
            + (f"; errors {s.errors}" if s.errors else "")
        )
        print(f"  {s.name}: {_stage_line(d)}")
        if d.get("empty_fetches"):
            print(
                f"  {s.name}: WARNING drain() passed {d['empty_fetches']:.0f} empty fetch(es) to the writer, "
                "which fails on them (pipeline bug); the benchmark's drain process skipped them"
            )
        if s.drain_exit is not None:
            print(
                f"  {s.name}: ERROR the drain process exited with code {s.drain_exit}; see drain.log (--keep)"
            )


def _stage_line(drain: dict[str, float]) -> str:
    """The drain's time per pipeline stage, per batch and as a share of the whole: the next bottleneck."""
    from meter_platform.ingestion.timing import STAGES

    seconds = {stage: drain.get(f"stage_{stage}", 0.0) for stage in STAGES}
    total, batches = sum(seconds.values()), drain.get("batches", 0)
    if not total or not batches:
        return "time per stage: no batches"
    parts = [
        f"{stage} {1000 * s / batches:.1f} ms ({100 * s / total:.0f}%)" for stage, s in seconds.items() if s
    ]
    return "time per batch by stage: " + ", ".join(parts)


def print_targets(capture: list[Result], stages: list[E2EResult], args: argparse.Namespace) -> None:
    """Each target of the speed issue this run measures: the figure, the target and met or not.
    (``quiet.py`` and ``query.py`` print theirs: first event after quiet, usage queries at volume.)"""
    by_name = {r.name: r for r in capture}
    batch, single = f"batch of {args.batch_size}", "single event"
    rows: list[tuple[str, str, str, bool]] = []
    gw_b, direct_b = by_name.get(f"gateway, {batch}"), by_name.get(f"direct JetStream, {batch}")
    if gw_b and direct_b and direct_b.eps:
        ratio = gw_b.eps / direct_b.eps
        rows.append((f"gateway / direct, {batch}", f"{ratio:.2f}", ">= 0.8", ratio >= 0.8))
    gw_s, direct_s = by_name.get(f"gateway, {single}"), by_name.get(f"direct JetStream, {single}")
    if gw_s:
        rows.append(("gateway single events, req/s", f"{gw_s.rps:,.0f}", ">= 10,000", gw_s.rps >= 10_000))
        p99 = pct(gw_s.latencies, 99) * 1000
        rows.append(("gateway single events, p99 ms", f"{p99:,.1f}", "<= 20", p99 <= 20))
        if direct_s and direct_s.rps:
            ratio = gw_s.rps / direct_s.rps
            rows.append(("gateway / direct single publishes", f"{ratio:.2f}", ">= 1.8", ratio >= 1.8))
    for s in stages:
        if s.name == "max":
            ok = s.caught_up and s.e2e_eps >= 80_000
            figure = f"{s.e2e_eps:,.0f}" if s.caught_up else "not caught up"
            rows.append(("end to end, max stage, events/s", figure, ">= 80,000", ok))
        if s.name == "steady" and s.freshness:
            p95 = pct(s.freshness, 95) * 1000
            rows.append(("steady freshness p95 ms", f"{p95:,.0f}", "<= 1,000", p95 <= 1000))
        for proc, limit in (("gateway", 200), ("drain", 1024)):
            if proc in s.peak_rss_mb:
                mb = s.peak_rss_mb[proc]
                rows.append((f"peak RSS {proc} MiB, {s.name}", f"{mb:,.0f}", f"<= {limit:,}", mb <= limit))
    if not rows:
        return
    print()
    print("TARGETS")
    for what, figure, target, met in rows:
        print(f"  {what:40} {figure:>14}   target {target:10} {'met' if met else 'NOT MET'}")
