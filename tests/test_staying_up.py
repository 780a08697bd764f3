"""What keeps the platform serving through the failures of a chaos run: a changed stream limit that
must take effect, zombie runs that must not hold ingestion back, a drain whose run is gone, a broker
that must be restarted. Real servers throughout (tests/conftest.py)."""

from __future__ import annotations

import asyncio

import pytest

from meter_platform.capture import jetstream
from meter_platform.config import STREAM_NAME

pytestmark = pytest.mark.usefixtures("clean")


async def _ensure_and_read_limits(url: str, apply_limits: bool) -> tuple[int, int, int]:
    nc = await jetstream.connect(url, name="tests")
    try:
        js = nc.jetstream()
        await jetstream.ensure_stream_and_consumer(js, apply_limits=apply_limits)
        info = await js.stream_info(STREAM_NAME)
        return info.config.max_msgs, info.config.max_bytes, info.state.messages
    finally:
        await nc.close()


def test_changed_stream_limits_apply_to_the_existing_stream_at_start(nats_server, monkeypatch):
    from tests.helpers import api_call, publish

    publish(nats_server.url, [api_call("l1")])
    publish(nats_server.url, [api_call("l2")])
    assert asyncio.run(_ensure_and_read_limits(nats_server.url, True)) == (-1, -1, 2)
    monkeypatch.setenv("METER_STREAM_MAX_MSGS", "1")  # below what the stream holds
    monkeypatch.setenv("METER_STREAM_MAX_BYTES", str(64 * 1024 * 1024))
    # Any other process ensuring the stream leaves its limits alone (a limit tuned while running stays).
    assert asyncio.run(_ensure_and_read_limits(nats_server.url, False)) == (-1, -1, 2)
    # The platform's start applies them; with discard=new nothing already accepted is dropped.
    assert asyncio.run(_ensure_and_read_limits(nats_server.url, True)) == (1, 64 * 1024 * 1024, 2)
    monkeypatch.delenv("METER_STREAM_MAX_MSGS")
    monkeypatch.delenv("METER_STREAM_MAX_BYTES")
    assert asyncio.run(_ensure_and_read_limits(nats_server.url, True)) == (-1, -1, 2)


# --- 4. a drain whose run is gone stops ------------------------------------------------------------


def test_the_drain_stops_fetching_once_should_stop_turns_true(nats_server, database_url, catalog):
    import time

    from meter_platform.config import DrainSettings
    from tests.helpers import api_call, backlog, publish, run_drain

    for i in range(5):
        publish(nats_server.url, api_call(f"stop{i}"))
    batches = []
    settings = DrainSettings(batch_size=1, fetch_timeout=0.3, max_seconds=60, idle_seconds=60)
    started = time.monotonic()
    total = run_drain(
        nats_server.url,
        database_url,
        catalog,
        settings=settings,
        on_batch=batches.append,
        should_stop=lambda: len(batches) >= 2,
    )
    assert time.monotonic() - started < 10  # not the 60 s of idling
    assert total.messages == 2
    state = backlog(nats_server.url)
    assert (state.ack_floor, state.pending, state.ack_pending) == (2, 3, 0)  # the rest waits for the next run


_ORPHAN = """
import asyncio, sys
from pathlib import Path
from meter_platform.catalog import load_catalog
from meter_platform.config import EXAMPLE_CATALOG_DIR, DrainSettings
from meter_platform.ingestion.drain import drain, parent_exited

nats_url, database_url, done = sys.argv[1:4]
settings = DrainSettings(batch_size=10, fetch_timeout=0.3, max_seconds=600, idle_seconds=600)
total = asyncio.run(drain(nats_url, database_url, load_catalog(EXAMPLE_CATALOG_DIR), settings,
                          should_stop=parent_exited()))
Path(done).write_text(str(total.messages))
"""


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (PID 1 of a container may not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_drain_whose_parent_is_killed_stops(nats_server, database_url, tmp_path):
    """The run worker (the parent) is killed -9: its step's drain notices and exits, instead of
    draining on where nothing records it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import api_call, publish, scalar

    script, done = tmp_path / "orphan.py", tmp_path / "done"
    script.write_text(_ORPHAN)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable] + sys.argv[1:]); print(p.pid, flush=True); time.sleep(600)",
            str(script),
            nats_server.url,
            database_url,
            str(done),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert worker.stdout is not None
        step_pid = int(worker.stdout.readline())
        publish(nats_server.url, api_call("orphan1"))
        deadline = time.monotonic() + 60
        while scalar(database_url, "SELECT count(*) FROM usage_events") == 0:  # the drain is draining
            assert time.monotonic() < deadline and _running(step_pid), "the drain never stored the event"
            time.sleep(0.2)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 10
        while _running(step_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(step_pid), "the orphaned drain kept running"
        assert done.read_text() == "1"
    finally:
        worker.kill()
        worker.wait()
        if _running(step_pid):
            os.kill(step_pid, signal.SIGKILL)


# --- 1. zombie runs do not hold ingestion back ---------------------------------------------------


def _ingest_job(nats_url: str, database_url: str):
    from dagster import Definitions

    from meter_platform import definitions
    from meter_platform.config import EXAMPLE_CATALOG_DIR
    from meter_platform.defs.ingestion.jobs import ingest_microbatch_job
    from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource

    defs = Definitions(
        assets=definitions.defs.assets,
        jobs=[ingest_microbatch_job],
        resources={
            "nats": NatsResource(url=nats_url),
            "postgres": PostgresResource(url=database_url),
            "catalog": CatalogResource(catalog_dir=str(EXAMPLE_CATALOG_DIR)),
        },
    )
    return defs.resolve_job_def("ingest_microbatch_job")


def _evaluate_sensor(instance, nats_url: str):
    from dagster import build_sensor_context

    from meter_platform.defs.ingestion.sensors import jetstream_backlog_sensor
    from meter_platform.defs.resources import NatsResource

    context = build_sensor_context(instance=instance, resources={"nats": NatsResource(url=nats_url)})
    return jetstream_backlog_sensor(context)


def test_runs_left_started_with_no_process_behind_them_do_not_stall_ingestion(
    nats_server, database_url, monkeypatch
):
    """Two runs stay STARTED after a power cut (no process, no heartbeat since): the sensor fails them
    and requests a run, instead of skipping every tick because two runs are 'already draining'."""
    import time

    from dagster import DagsterInstance, DagsterRunStatus, RunRequest, SkipReason

    from meter_platform.defs.ingestion.liveness import HEARTBEAT_TAG
    from tests.helpers import api_call, publish

    monkeypatch.setenv("METER_RUN_STALE_SECONDS", "2")
    monkeypatch.setenv("METER_RUN_START_GRACE_SECONDS", "1")
    monkeypatch.setenv("METER_WARM_RUNS", "0")  # the runs here are busy runs; no warm one is wanted
    instance = DagsterInstance.ephemeral()
    job = _ingest_job(nats_server.url, database_url)
    publish(nats_server.url, api_call("z1"))
    stale = {HEARTBEAT_TAG: f"{time.time() - 30:.3f}"}
    zombie = instance.create_run_for_job(job, status=DagsterRunStatus.STARTED, tags=stale)
    silent = instance.create_run_for_job(job, status=DagsterRunStatus.STARTED)  # died before its first beat
    alive = instance.create_run_for_job(job, status=DagsterRunStatus.STARTED)
    time.sleep(1.2)  # all three are past their start grace
    instance.add_run_tags(alive.run_id, {HEARTBEAT_TAG: f"{time.time():.3f}"})

    result = _evaluate_sensor(instance, nats_server.url)
    # The live run drains the small backlog; the two dead ones are failed, no longer counted.
    assert isinstance(result, SkipReason) and "keep up" in (result.skip_message or ""), result
    status = [instance.get_run_by_id(r.run_id).status for r in (zombie, silent, alive)]
    assert status == [DagsterRunStatus.FAILURE, DagsterRunStatus.FAILURE, DagsterRunStatus.STARTED]
    failure = instance.all_logs(zombie.run_id)[-1]
    assert "taken for dead: no heartbeat for" in (failure.message or "")

    time.sleep(2.2)  # now the last one stops beating too
    result = _evaluate_sensor(instance, nats_server.url)
    assert isinstance(result, RunRequest), result
    assert instance.get_run_by_id(alive.run_id).status == DagsterRunStatus.FAILURE


def test_a_run_in_its_start_grace_or_beating_is_counted(nats_server, database_url):
    from dagster import DagsterInstance, DagsterRunStatus, SkipReason

    from tests.helpers import api_call, publish

    instance = DagsterInstance.ephemeral()
    job = _ingest_job(nats_server.url, database_url)
    publish(nats_server.url, api_call("g1"))
    for _ in range(2):
        instance.create_run_for_job(job, status=DagsterRunStatus.STARTED)  # just started, no beat yet
    result = _evaluate_sensor(instance, nats_server.url)
    assert isinstance(result, SkipReason) and "the limit" in (result.skip_message or "")


def test_a_draining_run_writes_its_heartbeat(nats_server, database_url):
    from dagster import DagsterInstance

    from meter_platform.defs.ingestion.liveness import HEARTBEAT_TAG
    from tests.helpers import api_call, publish

    publish(nats_server.url, api_call("hb1"))
    instance = DagsterInstance.ephemeral()
    config = {"max_seconds": 30, "idle_seconds": 0.5, "batch_size": 100}
    result = _ingest_job(nats_server.url, database_url).execute_in_process(
        run_config={"ops": {"ingest_microbatches": {"config": config}}}, instance=instance
    )
    assert result.success
    assert float(instance.get_run_by_id(result.run_id).tags[HEARTBEAT_TAG]) > 0
    [materialization] = [
        m
        for m in result.asset_materializations_for_node("ingest_microbatches")
        if m.asset_key.path == ["usage_events"]
    ]
    assert materialization.metadata["stored"].value == 1  # the run was not taken for gone


def test_a_micro_batch_run_runs_the_drain_and_not_the_data_quality_checks():
    """The data-quality checks targeting the ingestion assets ran inside every micro-batch run as well
    (the job selected the assets with all their checks): minutes of queries per run under traffic."""
    from meter_platform.definitions import defs

    job = defs.resolve_job_def("ingest_microbatch_job")
    assert [node.name for node in job.graph.node_defs] == ["ingest_microbatches"]
    assert [key.name for key in job.asset_layer.asset_graph.asset_check_keys] == ["ingest_ledger_balances"]


def test_a_drain_stops_once_its_run_is_no_longer_started(nats_server, database_url):
    """The sensor took the run for dead (or someone canceled it): its drain, alive after all, stops."""
    from dagster import DagsterInstance, DagsterRunStatus

    from meter_platform.defs.ingestion.liveness import HEARTBEAT_TAG, RunWatch

    instance = DagsterInstance.ephemeral()
    run = instance.create_run_for_job(
        _ingest_job(nats_server.url, database_url), status=DagsterRunStatus.STARTED
    )
    watch = RunWatch(instance, run.run_id)
    watch.heartbeat()
    assert not watch.should_stop() and HEARTBEAT_TAG in instance.get_run_by_id(run.run_id).tags
    instance.report_run_failed(run, "taken for dead")
    assert not watch.should_stop()  # noticed at the next heartbeat, within seconds
    watch.heartbeat()
    assert watch.should_stop() and watch.gone == "the run is FAILURE"


# --- 1b. an alert when events wait too long ------------------------------------------------------


def test_backlog_age_check_fails_when_the_oldest_waiting_event_is_too_old():
    from datetime import UTC, datetime, timedelta

    from meter_platform import quality

    settings = quality.QualitySettings(max_backlog_age=timedelta(minutes=5))
    now = datetime(2025, 7, 24, 10, 30, tzinfo=UTC)
    assert quality.backlog_age(None, 0, settings, now).passed
    fresh = quality.backlog_age(now - timedelta(minutes=4), 12, settings, now)
    assert fresh.passed and fresh.metadata["oldest_age_seconds"] == 240
    stale = quality.backlog_age(now - timedelta(minutes=6), 12, settings, now)
    assert not stale.passed and (stale.severity, stale.asset) == ("ERROR", "jetstream_events")
    assert "12 events waiting" in stale.description and "6.0 minutes" in stale.description


def test_the_oldest_waiting_event_is_read_from_jetstream(nats_server, database_url, catalog, monkeypatch):
    """The data-quality run reads the real stream: an event left waiting makes the check fail."""
    import time
    from datetime import UTC, datetime

    from dagster import DagsterInstance, Definitions

    from meter_platform.config import EXAMPLE_CATALOG_DIR
    from meter_platform.defs.quality.checks import DATA_QUALITY_SUMMARY, data_quality_checks, data_quality_job
    from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource
    from tests.helpers import api_call, publish

    async def oldest() -> datetime | None:
        nc = await jetstream.connect(nats_server.url, name="tests")
        try:
            return await jetstream.oldest_pending(nc.jetstream())
        finally:
            await nc.close()

    assert asyncio.run(oldest()) is None
    before = datetime.now(UTC)
    publish(nats_server.url, api_call("old1"))
    publish(nats_server.url, api_call("old2"))
    stored = asyncio.run(oldest())
    assert stored is not None and abs((stored - before).total_seconds()) < 2

    monkeypatch.setenv("METER_QUALITY_MAX_BACKLOG_AGE_MINUTES", str(1 / 60))  # one second
    time.sleep(1.5)
    job = Definitions(
        asset_checks=[data_quality_checks],
        assets=[DATA_QUALITY_SUMMARY],
        jobs=[data_quality_job],
        resources={
            "postgres": PostgresResource(url=database_url),
            "nats": NatsResource(url=nats_server.url),
            "catalog": CatalogResource(catalog_dir=str(EXAMPLE_CATALOG_DIR)),
        },
    ).resolve_job_def("data_quality_job")
    result = job.execute_in_process(instance=DagsterInstance.ephemeral())
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "backlog_age"]
    assert not check.passed and check.metadata["waiting_messages"].value == 2


# --- 5. NATS that failed a write on a full disk is restarted once there is room --------------------


def _publish_one(url: str, timeout: float = 1.0) -> bool:
    async def go() -> bool:
        nc = await jetstream.connect(url, name="tests", max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            await jetstream.ensure_stream_and_consumer(js)
            await js.publish("meter.events.api_call", b"x" * 10_000, timeout=timeout)
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB file system of its own (tmpfs; needs root and the right to mount)."""
    import os
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)]).returncode
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_nats_that_hit_a_full_disk_is_restarted_once_there_is_room_again(small_disk):
    import os
    import time

    from meter_platform.runtime.health import JetStreamHealth
    from meter_platform.runtime.servers import start_nats
    from meter_platform.runtime.supervisor import Supervisor

    lines: list[str] = []
    store = small_disk / "nats"
    nats = start_nats(store)
    port = int(nats.url.rsplit(":", 1)[1])
    supervisor = Supervisor(lines.append, first_delay=0.2, check_every=0.2)
    supervisor.add(
        "nats",
        lambda: start_nats(store, port=port),
        server=nats,
        check=JetStreamHealth(store, nats.log, lines.append, min_free_bytes=4 * 2**20),
    )
    filler = small_disk / "filler"
    try:
        assert _publish_one(nats.url)
        stat = os.statvfs(small_disk)
        filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 1_000_000))  # leave 1 MB
        published = 0
        while _publish_one(nats.url, timeout=0.5):
            published += 1
            assert published < 500, "the disk never filled"
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:
            supervisor.poll()
            time.sleep(0.1)
        assert supervisor["nats"] is nats, "restarted while the disk was still full"
        assert "nats cannot write its JetStream store" in lines[0] and "no space left on device" in lines[0]

        filler.unlink()  # room again; the server that failed the write still refuses every publish
        assert not _publish_one(nats.url)
        deadline = time.monotonic() + 15
        while supervisor["nats"] is nats or supervisor["nats"].process.poll() is not None:
            assert time.monotonic() < deadline, lines
            supervisor.poll()
            time.sleep(0.1)
        assert "failed to write its JetStream store" in lines[1] and "has room again" in lines[1]
        assert lines[2].startswith(f"nats restarted at {nats.url}")
        assert _publish_one(nats.url)  # the same port and store, accepting events again
    finally:
        supervisor.stop()


def test_nats_without_jetstream_is_restarted(tmp_path):
    """JetStream disabled (as nats-server does when it runs out of resources): the API does not answer."""
    import time

    from meter_platform.runtime.health import JetStreamHealth
    from meter_platform.runtime.servers import (
        Server,
        free_port,
        nats_server_binary,
        spawn,
        start_nats,
        wait_for_port,
    )
    from meter_platform.runtime.supervisor import Supervisor

    port, store = free_port(), tmp_path / "nats"
    store.mkdir()
    log = store / "nats-server.log"
    plain = spawn([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)], log)  # no JetStream
    wait_for_port("127.0.0.1", port, plain, "nats-server", log)
    lines: list[str] = []
    supervisor = Supervisor(lines.append, first_delay=0.1, check_every=0.1)
    server = Server("nats", plain, f"nats://127.0.0.1:{port}", log)
    supervisor.add(
        "nats",
        lambda: start_nats(store, port=port),
        server=server,
        check=JetStreamHealth(store, log, lines.append),
    )
    try:
        deadline = time.monotonic() + 15
        while supervisor["nats"] is server:
            assert time.monotonic() < deadline, lines
            supervisor.poll()
            time.sleep(0.05)
        assert "does not serve JetStream" in lines[0]
        assert _publish_one(server.url)
    finally:
        supervisor.stop()
        if plain.poll() is None:
            plain.kill()
