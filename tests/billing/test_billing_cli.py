"""`meter bill` and `meter invoices` against the real PostgreSQL, with runs recorded in a Dagster instance."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from dagster import DagsterInstance, RunsFilter

from meter_platform.cli import main
from tests.billing.support import MARCH


def test_meter_bill_runs_the_job_on_the_instance_and_prints_totals(
    march, database_url, tmp_path, monkeypatch, capsys
):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("METER_DATABASE_URL", database_url)
    monkeypatch.setenv("METER_CATALOG_DIR", str(march.directory))

    assert main(["bill", "--period", MARCH]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("a ", "b "))}
    assert rows["a"][2:] == ["draft", "DRAFT", "USD", "4", "20.94", "20.94"]
    assert rows["b"][-1] == "31.68"
    with DagsterInstance.get() as instance:
        runs = instance.get_run_records(RunsFilter(job_name="billing_job"))
        assert [r.dagster_run.tags.get("dagster/partition") for r in runs] == [MARCH]

    running = f"{datetime.now(UTC):%Y-%m}"
    assert main(["bill", "--period", running, "--finalize"]) == 2
    assert "cannot be finalized before" in capsys.readouterr().err
    assert main(["bill", "--period", "2026-13"]) == 2
    assert "is not a month" in capsys.readouterr().err
    assert main(["bill", "--period", "March"]) == 2
    assert "YYYY-MM" in capsys.readouterr().err

    assert main(["invoices", "--period", MARCH, "--customer", "b", "--json"]) == 0
    (invoice,) = json.loads(capsys.readouterr().out)["invoices"]
    assert invoice["total"] == "31.68" and invoice["status"] == "draft"
    assert main(["customers"]) == 0
    assert "pro" in capsys.readouterr().out
