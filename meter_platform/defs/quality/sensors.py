"""The sensor that turns failing data-quality checks into alerts, and their clearing into recovery
notices, on the channels of ``alerts.yaml``. It launches no run: evaluating and delivering happen in the
tick, and every bit of state is in PostgreSQL (see ``meter_platform/alerts.py``)."""

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from meter_platform import alerts, quality
from meter_platform.config import EXAMPLE_CATALOG_DIR
from meter_platform.defs.resources import CatalogResource, PostgresResource
from meter_platform.storage import db


@sensor(
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Opens an alert episode when a data-quality check starts failing and closes it when the check "
        "passes, sending one alert and one recovery notice per episode to the channels of alerts.yaml."
    ),
)
def data_quality_alert_sensor(
    context: SensorEvaluationContext, postgres: PostgresResource, catalog: CatalogResource
):
    """Compare the latest check outcomes with the open episodes, then send what the outbox holds."""
    # A broken alerts.yaml raises AlertConfigError: the tick fails in the UI with every problem listed,
    # rather than skipping quietly while checks fail unnoticed.
    channels = alerts.load_channels(alerts.alerts_path(catalog.catalog_dir or EXAMPLE_CATALOG_DIR))
    with db.connect(postgres.url, autocommit=True) as conn:
        evaluation = alerts.evaluate(conn, quality.latest_outcomes(conn), channels)
        report = alerts.deliver(conn, channels)
    summary = alerts.summarize(evaluation, report)
    if report.failed:
        context.log.warning(summary)
    return SkipReason(summary)
