"""Running the billing job from the ``meter bill`` command, on the platform's Dagster instance, so the
run is in the UI's run list and on the assets' partitions like one launched there."""

from __future__ import annotations

import warnings

from dagster import BetaWarning, DagsterInstance, DagsterRunStatus, PreviewWarning


def run_billing_job(
    period: str, finalize: bool, instance: DagsterInstance | None = None
) -> tuple[bool, str, str]:
    """Run ``billing_job`` for ``period`` in this process against ``instance`` (default: DAGSTER_HOME's);
    returns (success, run id, the error when it failed)."""
    # The terminal wants the outcome, not Dagster's notices about its own preview APIs or step-by-step
    # DEBUG lines (the run's full log is in the UI).
    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    from meter_platform.definitions import defs

    instance = instance or DagsterInstance.get()
    result = defs.resolve_job_def("billing_job").execute_in_process(
        instance=instance,
        partition_key=period,
        run_config={
            "ops": {"billing_period": {"config": {"finalize": finalize}}},
            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
        },
        tags={"meter/launched_by": "meter bill"},
        raise_on_error=False,
    )
    error = ""
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        info = failures[0].step_failure_data.error if failures else None
        error = info.message.strip() if info is not None else "the run failed"
        status = instance.get_run_by_id(result.run_id)
        if status is not None and status.status != DagsterRunStatus.FAILURE:
            error += f" (run status {status.status.value})"
    return result.success, result.run_id, error
