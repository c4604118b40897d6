"""docker/ without a Docker engine: the files parse, and every command a container runs is one the CLI accepts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from scheduler.cli import main

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def compose() -> dict[str, object]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def our_services() -> dict[str, dict[str, object]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return {name: spec for name, spec in services.items() if spec.get("image") == "order-timeouts:local"}


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["order-timeouts", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def test_compose_runs_the_whole_deployment() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert {"postgres", "redis", "rabbitmq", "init-db", "worker", "maintain", "prometheus"} <= set(services)
    assert "--appendonly" in services["redis"]["command"], "Redis keeps its timers across restarts"
    assert services["rabbitmq"]["image"].endswith("-management")
    for name in ("postgres", "redis", "rabbitmq", "prometheus"):
        assert "healthcheck" in services[name], name
    assert services["worker"]["deploy"]["replicas"] >= 2


@pytest.mark.parametrize("service", sorted(our_services()))
def test_every_container_command_is_a_valid_cli_invocation(
    service: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    command = our_services()[service]["command"]
    assert isinstance(command, list)
    # --help after the real arguments: the CLI parses them all, then prints help instead of running.
    assert run_cli([*command, "--help"], monkeypatch) == 0, capsys.readouterr().err


def test_prometheus_scrapes_the_ports_the_services_serve() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    ports = {str(c["port"]) for job in config["scrape_configs"] for c in job.get("dns_sd_configs", [])}
    ports |= {
        t.rsplit(":", 1)[1]
        for job in config["scrape_configs"]
        for c in job.get("static_configs", [])
        for t in c["targets"]
    }
    for service in ("worker", "maintain"):
        command = our_services()[service]["command"]
        assert isinstance(command, list)
        assert command[command.index("--metrics-port") + 1] in ports


def test_dockerfile_is_slim_non_root_with_the_console_script_as_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["order-timeouts"]' in text
    health = re.search(r'HEALTHCHECK .* CMD \["order-timeouts", (.*)\]', text)
    assert health
    args = [part.strip().strip('"') for part in health.group(1).split(",")]
    assert run_cli([*args, "--help"], monkeypatch) == 0
