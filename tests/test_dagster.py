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


def test_sensor_skips_an_empty_stream_and_requests_a_run_for_a_backlog(nats_server):
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


def test_sensor_respects_the_concurrent_run_limit(nats_server, database_url):
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
