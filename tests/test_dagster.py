"""The Dagster side: the backlog sensor as a function, the micro-batch job in process, both against
the real servers."""

from __future__ import annotations

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    RunRequest,
    SkipReason,
    build_sensor_context,
)

from meter_platform import definitions
from meter_platform.config import EXAMPLE_CATALOG_DIR
from meter_platform.defs.ingestion.jobs import ingest_microbatch_job
from meter_platform.defs.ingestion.sensors import jetstream_backlog_sensor
from meter_platform.defs.resources import CatalogResource, NatsResource, PostgresResource
from tests.helpers import api_call, backlog, publish, scalar

pytestmark = pytest.mark.usefixtures("clean")

FAST = {
    "ops": {"ingest_microbatches": {"config": {"max_seconds": 30, "idle_seconds": 0.5, "batch_size": 100}}}
}


def test_code_location_loads():
    defs = definitions.defs
    assert defs.resolve_job_def("ingest_microbatch_job") is not None
    assert defs.resolve_sensor_def("jetstream_backlog_sensor") is not None


def _defs(nats_url: str, database_url: str) -> Definitions:
    return Definitions(
        assets=definitions.defs.assets,
        jobs=[ingest_microbatch_job],
        sensors=[jetstream_backlog_sensor],
        resources={
            "nats": NatsResource(url=nats_url),
            "postgres": PostgresResource(url=database_url),
            "catalog": CatalogResource(catalog_dir=str(EXAMPLE_CATALOG_DIR)),
        },
    )


def test_sensor_skips_an_empty_stream_and_requests_a_run_for_a_backlog(nats_server, monkeypatch):
    monkeypatch.setenv("METER_WARM_RUNS", "0")  # runs only while events wait
    instance = DagsterInstance.ephemeral()
    context = build_sensor_context(instance=instance, resources={"nats": NatsResource(url=nats_server.url)})
    result = jetstream_backlog_sensor(context)
    assert isinstance(result, SkipReason)
    assert "no events waiting" in (result.skip_message or "")

    publish(nats_server.url, [api_call("s1"), api_call("s2")])
    publish(nats_server.url, api_call("s3"))
    context = build_sensor_context(instance=instance, resources={"nats": NatsResource(url=nats_server.url)})
    result = jetstream_backlog_sensor(context)
    assert isinstance(result, RunRequest)
    assert result.tags["meter/backlog"] == "2"
    assert context.cursor == "2"


def test_sensor_respects_the_concurrent_run_limit(nats_server, database_url, monkeypatch):
    monkeypatch.setenv("METER_WARM_RUNS", "0")
    instance = DagsterInstance.ephemeral()
    job = _defs(nats_server.url, database_url).resolve_job_def("ingest_microbatch_job")
    publish(nats_server.url, api_call("busy"))

    def evaluate():
        context = build_sensor_context(
            instance=instance, resources={"nats": NatsResource(url=nats_server.url)}
        )
        return jetstream_backlog_sensor(context)

    instance.create_run_for_job(job, status=DagsterRunStatus.STARTED)
    result = evaluate()  # one run drains a small backlog: no second run
    assert isinstance(result, SkipReason) and "keep up" in (result.skip_message or "")
    instance.create_run_for_job(job, status=DagsterRunStatus.STARTING)
    result = evaluate()
    assert isinstance(result, SkipReason) and "the limit" in (result.skip_message or "")


def test_job_drains_into_postgres_and_reports_counts(nats_server, database_url):
    publish(nats_server.url, [api_call("j1"), api_call("j1"), api_call("j2", method="FETCH")])
    publish(nats_server.url, api_call("j3", customer="c2"))
    job = _defs(nats_server.url, database_url).resolve_job_def("ingest_microbatch_job")
    result = job.execute_in_process(run_config=FAST, instance=DagsterInstance.ephemeral())
    assert result.success
    materializations = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("ingest_microbatches")
    }
    assert set(materializations) == {"usage_events", "quarantined_events", "usage_minute_aggregates"}
    events = materializations["usage_events"]
    assert events["events"].value == 4
    assert events["stored"].value == 2
    assert events["duplicates"].value == 1
    assert materializations["quarantined_events"]["quarantined"].value == 1
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("ingest_ledger_balances", True)]
    assert (
        scalar(
            database_url, "SELECT sum(event_count) FROM usage_minute_aggregates WHERE meter_slug='api_calls'"
        )
        == 2
    )
    state = backlog(nats_server.url)
    assert state.pending == 0 and state.ack_pending == 0 and state.ack_floor == 2


def test_catalog_change_is_noticed_and_replayed_by_the_job(nats_server, database_url, catalog, tmp_path):
    import shutil

    from meter_platform.defs.meters.jobs import meter_replay_job
    from meter_platform.defs.meters.sensors import meter_catalog_sensor
    from meter_platform.meters.aggregates import pending_changes
    from meter_platform.storage import db
    from tests.helpers import run_drain

    publish(
        nats_server.url, [api_call("m1", region="eu-west-1"), api_call("m2"), api_call("m3", customer="c2")]
    )
    run_drain(nats_server.url, database_url, catalog)
    resources = {
        "postgres": PostgresResource(url=database_url),
        "catalog": CatalogResource(catalog_dir=str(tmp_path)),
    }
    shutil.copytree(EXAMPLE_CATALOG_DIR, tmp_path, dirs_exist_ok=True)
    instance = DagsterInstance.ephemeral()
    result = meter_catalog_sensor(build_sensor_context(instance=instance, resources=resources))
    assert isinstance(result, SkipReason)

    # The operator narrows api_calls to one region.
    meters_yaml = tmp_path / "meters.yaml"
    meters_yaml.write_text(
        meters_yaml.read_text().replace(
            "    group_by: [endpoint, method, region]\n",
            "    group_by: [endpoint, method, region]\n    filter: {region: eu-west-1}\n",
            1,
        )
    )
    result = meter_catalog_sensor(build_sensor_context(instance=instance, resources=resources))
    assert isinstance(result, RunRequest)
    assert result.run_config == {"ops": {"replay_meters": {"config": {"slugs": ["api_calls"]}}}}

    defs = Definitions(
        jobs=[meter_replay_job],
        resources={**resources, "nats": NatsResource(url=nats_server.url)},
    )
    run = defs.resolve_job_def("meter_replay_job").execute_in_process(
        run_config=result.run_config, instance=instance
    )
    assert run.success
    [materialization] = run.asset_materializations_for_node("replay_meters")
    assert materialization.metadata["meter"].value == "api_calls"
    assert materialization.metadata["customers_changed"].value == 2
    assert "| c1 | 2 | 1 |" in materialization.metadata["old_vs_new"].value
    assert (
        scalar(
            database_url, "SELECT sum(event_count) FROM usage_minute_aggregates WHERE meter_slug='api_calls'"
        )
        == 1
    )
    with db.connect(database_url) as conn:
        assert pending_changes(CatalogResource(catalog_dir=str(tmp_path)).load(), conn) == []


def test_sensor_requests_a_successor_before_a_busy_run_runs_out_of_time(
    nats_server, database_url, monkeypatch
):
    from meter_platform.defs.ingestion import sensors

    monkeypatch.setenv("METER_WARM_RUNS", "0")
    instance = DagsterInstance.ephemeral()
    job = _defs(nats_server.url, database_url).resolve_job_def("ingest_microbatch_job")
    instance.create_run_for_job(job, status=DagsterRunStatus.STARTED)

    def evaluate(cursor: str | None):
        context = build_sensor_context(
            instance=instance, cursor=cursor, resources={"nats": NatsResource(url=nats_server.url)}
        )
        return jetstream_backlog_sensor(context), context.cursor

    publish(nats_server.url, api_call("h1"))
    result, cursor = evaluate(None)
    assert isinstance(result, SkipReason) and "keep up" in (result.skip_message or "")  # a fresh run drains
    monkeypatch.setattr(sensors, "RUN_SECONDS", 30.0)  # the run is now near the end of its time budget
    result, _ = evaluate(cursor)
    assert isinstance(result, RunRequest) and result.tags["meter/handoff"] == "true"
    # Nothing waiting and nothing new since the last tick: no successor needed.
    run_drain_all(nats_server.url, database_url)
    result, cursor = evaluate(None)
    assert isinstance(result, SkipReason)
    publish(nats_server.url, api_call("h2"))  # traffic continues, even if a drainer takes it at once
    run_drain_all(nats_server.url, database_url)
    result, _ = evaluate(cursor)
    assert isinstance(result, RunRequest) and result.tags["meter/handoff"] == "true"


def run_drain_all(nats_url: str, database_url: str) -> None:
    from meter_platform.catalog import load_catalog
    from tests.helpers import run_drain

    run_drain(nats_url, database_url, load_catalog(EXAMPLE_CATALOG_DIR))


def test_sensor_keeps_a_warm_run_ready_and_hands_over_before_its_budget_ends(nats_server, database_url):
    """With warm runs on (the default), a run is requested on an empty stream, configured to stay for
    its budget; while it is young nothing more is requested; near its end, a warm successor is."""
    from meter_platform.defs.ingestion import sensors

    instance = DagsterInstance.ephemeral()
    job = _defs(nats_server.url, database_url).resolve_job_def("ingest_microbatch_job")

    def evaluate():
        context = build_sensor_context(
            instance=instance, resources={"nats": NatsResource(url=nats_server.url)}
        )
        return jetstream_backlog_sensor(context)

    result = evaluate()
    assert isinstance(result, RunRequest) and result.tags[sensors.WARM_TAG] == "true"
    config = result.run_config["ops"]["ingest_microbatches"]["config"]
    assert config["max_seconds"] == config["idle_seconds"] == 1800
    assert int(result.tags["dagster/max_runtime"]) > 1800  # run monitoring must not cancel it early

    warm_tags = {sensors.WARM_TAG: "true", sensors.BUDGET_TAG: "1800"}
    instance.create_run_for_job(job, status=DagsterRunStatus.STARTED, tags=warm_tags)
    result = evaluate()
    assert isinstance(result, SkipReason) and "no events waiting" in (result.skip_message or "")

    instance.create_run_for_job(
        job, status=DagsterRunStatus.STARTED, tags={**warm_tags, sensors.BUDGET_TAG: "30"}
    )
    instance.delete_run(
        next(r for r in instance.get_runs() if r.tags.get(sensors.BUDGET_TAG) == "1800").run_id
    )
    result = evaluate()  # the only warm run is within a minute of its 30 s budget
    assert isinstance(result, RunRequest)
    assert result.tags[sensors.WARM_TAG] == "true" and result.tags["meter/handoff"] == "true"
