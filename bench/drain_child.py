"""``--role drain``: the pipeline's drain() in its own process, timing the writer's batches; with
``--partition P`` (and METER_PARTITIONS > 1 in its environment) it drains partition P's consumer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any


def _write_stats(path: Path, stats: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)


def drain_child(args: argparse.Namespace) -> int:
    """``--role drain``: run the pipeline's drain() until SIGTERM, timing the writer's batches."""
    from meter_platform.catalog import load_catalog
    from meter_platform.config import DrainSettings, load_settings
    from meter_platform.ingestion.counts import BatchCounts
    from meter_platform.ingestion.drain import drain
    from meter_platform.ingestion.writer import MicroBatchWriter

    stats: dict[str, float] = {
        "batches": 0,
        "messages": 0,
        "events": 0,
        "write_seconds": 0.0,
        "empty_fetches": 0,
    }
    stats_file = Path(args.stats_file)
    original = MicroBatchWriter.write

    def timed_write(self, messages, run_id=None):
        if not messages:
            # nats-py's fetch() can return [] (a stale 408/404 status of an earlier pull); drain()
            # hands that to the writer, whose _commit() then fails on seqs[0] and ends the run.
            # Counted and reported; skipped here so the measurement goes on.
            stats["empty_fetches"] += 1
            _write_stats(stats_file, stats)
            return BatchCounts()
        t0 = time.perf_counter()
        counts = original(self, messages, run_id)
        stats["write_seconds"] += time.perf_counter() - t0
        stats["batches"] += 1
        stats["messages"] += len(messages)
        stats["events"] += counts.events
        _write_stats(stats_file, stats)
        return counts

    MicroBatchWriter.write = timed_write  # type: ignore[method-assign]

    def on_batch(counts: BatchCounts) -> None:
        # Seconds per pipeline stage (fetch ... ack), summed: where the next bottleneck is.
        for stage, seconds in counts.stages.items():
            stats[f"stage_{stage}"] = stats.get(f"stage_{stage}", 0.0) + seconds
        _write_stats(stats_file, stats)

    catalog = load_catalog(load_settings().catalog_dir)
    settings = DrainSettings(batch_size=args.drain_batch, max_seconds=1e9, idle_seconds=1e9)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await drain(
                args.nats_url,
                args.database_url,
                catalog,
                settings,
                run_id=f"bench-p{args.partition}",
                on_batch=on_batch,
                partition=args.partition,  # METER_PARTITIONS > 1: this partition's consumer
            )

    asyncio.run(main())
    return 0
