"""METER_GATEWAY_SERVER and METER_GATEWAY_WORKERS: the gateway's command line (no server started)."""

from __future__ import annotations

import pytest

from meter_platform.runtime import launch


def test_uvicorn_is_the_default_with_the_workers_asked_for(monkeypatch):
    monkeypatch.delenv("METER_GATEWAY_SERVER", raising=False)
    monkeypatch.setenv("METER_GATEWAY_WORKERS", "3")
    cmd = launch.gateway_command("127.0.0.1", 8123)
    assert cmd[0].endswith("uvicorn") and cmd[cmd.index("--workers") + 1] == "3"
    assert cmd[cmd.index("--port") + 1] == "8123" and launch.GATEWAY_APP in cmd


def test_granian_serves_the_same_app_factory(monkeypatch, tmp_path):
    monkeypatch.setenv("METER_GATEWAY_SERVER", " Granian ")
    monkeypatch.setattr(launch, "bin_dir", lambda: tmp_path)
    (tmp_path / "granian").touch()
    cmd = launch.gateway_command("0.0.0.0", 9000, workers=4)
    assert cmd[0] == str(tmp_path / "granian")
    assert cmd[cmd.index("--interface") + 1] == "asgi" and "--factory" in cmd and launch.GATEWAY_APP in cmd
    assert cmd[cmd.index("--workers") + 1] == "4" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--respawn-failed-workers" in cmd


def test_granian_not_installed_and_unknown_servers_are_told(monkeypatch, tmp_path):
    monkeypatch.setattr(launch, "bin_dir", lambda: tmp_path)
    with pytest.raises(SystemExit, match="pip"):
        launch.gateway_command("127.0.0.1", 8123, server="granian")
    monkeypatch.setenv("METER_GATEWAY_SERVER", "gunicorn")
    with pytest.raises(SystemExit, match="uvicorn, granian"):
        launch.gateway_command("127.0.0.1", 8123)
