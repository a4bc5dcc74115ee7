"""The Grafana dashboard and the alert rules name only metrics Relay exports."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay import metrics
from relay.model import QueueSummary

ROOT = Path(__file__).resolve().parent.parent


def _exported() -> set[str]:
    """Metric names as a query uses them (a counter ``x`` is queried as ``x_total``)."""
    text = metrics.render(QueueSummary({}, None), suppression_entries=0).decode()
    types = [line.split(" ")[2:4] for line in text.splitlines() if line.startswith("# TYPE ")]
    return {f"{name.removesuffix('_total')}_total" if kind == "counter" else name for name, kind in types}


def _used(text: str) -> set[str]:
    return set(re.findall(r"\brelay_[a-z_]+", text))


def test_dashboard_and_alerts_use_exported_metrics() -> None:
    exported = _exported()
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((ROOT / "deploy/prometheus-alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in _used(e)}
    assert used - exported == set()
    for needed in ("relay_bounces_total", "relay_complaints_total", "relay_suppressed_total",
                   "relay_suppression_entries", "relay_bounce_reports_total"):  # fmt: skip
        assert needed in exported
    assert any("relay_complaints_total" in e for e in exprs[-len(rules["groups"][0]["rules"]) :])


# -- the deploy kit: Dockerfile, docker-compose stack, systemd unit (no Docker daemon runs here:
# the compose file is checked by `docker-compose config`, the unit by `systemd-analyze verify`;
# `make deploy-tools` installs Debian's docker-compose)

DEPLOY = ROOT / "deploy"
SERVICES = {"postgres", "relay1", "relay2", "prometheus", "grafana"}


def _compose(env_file: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (`make deploy-tools` installs Debian's)")
    env = {k: v for k, v in os.environ.items() if k not in _example_env() and not k.startswith("RELAY_")}
    return subprocess.run(
        ["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "--env-file", str(env_file), "config"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


def _example_env() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as docker-compose resolves it with the example .env."""
    done = _compose(DEPLOY / ".env.example")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert isinstance(resolved, dict)
    return resolved


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the bind mounts of a resolved service."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("/"):
            out[target] = Path(source)
    return out


def test_compose_has_postgres_two_relays_on_one_database_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:15")
    assert any(v.startswith("postgres-data:/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    urls = {services[n]["environment"]["RELAY_STORE_URL"] for n in ("relay1", "relay2")}
    (url,) = urls  # the same database for both
    assert url.startswith("postgresql+asyncpg://relay:CHANGE-ME-postgres-password@postgres:5432/relay")
    secrets = {services[n]["environment"]["RELAY_TRACKING_SECRET"] for n in ("relay1", "relay2")}
    assert len(secrets) == 1  # VERP and tracking tokens from one node verify on the other
    for name in ("relay1", "relay2"):
        relay = services[name]
        assert relay["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert Path(relay["build"]["context"]).resolve() == ROOT
        assert (ROOT / relay["build"].get("dockerfile", "Dockerfile")).is_file()
        assert relay["volumes"][0].endswith(":/var/lib/relay:rw")


def test_compose_relays_take_their_settings_from_relay_variables_safely(compose: dict[str, Any]) -> None:
    """The environment is one Relay accepts (it refuses unknown RELAY_* variables): loopback-only
    trust (no open relay), tokens on the API and /metrics, and a stop timeout above the grace."""
    from relay.config import from_mapping

    for name in ("relay1", "relay2"):
        service = compose["services"][name]
        cfg = from_mapping({}, service["environment"])
        assert cfg.store.url.startswith("postgresql+asyncpg://")
        assert cfg.smtp.trusted_networks
        assert all(net.network_address.is_loopback and (net.version == 4 or net.prefixlen == 128)
                   for net in cfg.smtp.trusted_networks)  # fmt: skip
        assert cfg.http.api_tokens
        assert cfg.http.metrics_token
        assert cfg.tracking.secret
        grace = int(str(service["stop_grace_period"]).removesuffix("s"))
        assert grace > cfg.smtp.shutdown_grace + cfg.delivery.shutdown_grace
        for port in service["ports"]:  # published on the host's loopback only
            assert str(port).startswith("127.0.0.1:"), port
    for name in ("prometheus", "grafana"):
        assert all(str(p).startswith("127.0.0.1:") for p in compose["services"][name]["ports"])
    assert compose["services"]["relay2"]["depends_on"]["relay1"]["condition"] == "service_healthy"


# Connections one `relay serve` worker may hold on PostgreSQL: its pool (4, overflowing to 12)
# and the LISTEN connection for wake-ups (relay/store/engine.py, relay/store/wakeups.py).
CONNECTIONS_PER_WORKER = 13


def test_compose_nodes_have_a_cpu_quota_their_workers_and_connections_fit(compose: dict[str, Any]) -> None:
    """Each node runs a worker per CPU of its quota ([server] processes = "auto" reads the
    container's cgroup): both nodes' workers stay inside PostgreSQL's default max_connections
    (100, 3 of them reserved for superusers)."""
    from relay.config import from_mapping

    workers = 0
    for name in ("relay1", "relay2"):
        service = compose["services"][name]
        assert from_mapping({}, service["environment"]).server.processes == "auto"
        workers += math.ceil(float(service["cpus"]))
    assert workers * CONNECTIONS_PER_WORKER <= 100 - 3


def test_compose_refuses_to_run_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = _compose(empty)
    assert done.returncode != 0
    assert "deploy/.env" in done.stderr
    placeholders = _example_env()
    for key in ("POSTGRES_PASSWORD", "RELAY_TRACKING_SECRET", "RELAY_API_TOKENS", "RELAY_METRICS_TOKEN",
                "GRAFANA_ADMIN_PASSWORD"):  # fmt: skip
        assert placeholders[key].startswith("CHANGE-ME"), key
    assert ".env" in (ROOT / ".dockerignore").read_text()


def test_prometheus_scrapes_both_nodes_with_the_token_and_loads_the_alert_rules(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    mounts = _mounts(prom)
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    rules = [mounts[path] for path in config["rule_files"]]
    assert rules == [DEPLOY / "prometheus-alerts.yml"]
    assert yaml.safe_load(rules[0].read_text())["groups"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "relay"  # RelayDown names it
    targets = job["static_configs"][0]["targets"]
    assert sorted(targets) == ["relay1:8025", "relay2:8025"]
    assert {t.split(":")[0] for t in targets} <= set(compose["services"])
    token_file = job["authorization"]["credentials_file"]
    assert f"> {token_file}" in " ".join(prom["entrypoint"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in " ".join(prom["entrypoint"])


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    mounts = _mounts(compose["services"]["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    (provider,) = yaml.safe_load((provisioning / "dashboards/relay.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    dashboards = [host for path, host in mounts.items() if path.startswith(folder + "/") and path.endswith(".json")]
    assert dashboards == [DEPLOY / "grafana-dashboard.json"]
    dashboard = json.loads(dashboards[0].read_text())
    assert dashboard["uid"]
    # Provisioning substitutes no ${DS_...} inputs (only the UI's import does): the data source
    # variable must name the provisioned data source itself.
    placeholders = re.findall(r"\$\{DS_[A-Z_]+\}", json.dumps({k: v for k, v in dashboard.items() if k != "__inputs"}))
    assert placeholders == []
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == source["uid"]


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_runs_relay_serve_as_a_non_root_user_with_a_healthcheck() -> None:
    from relay.config import from_mapping

    lines = _dockerfile()
    assert lines[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK ") and " CMD " in line for line in lines)
    assert 'ENTRYPOINT ["relay"]' in lines
    assert 'CMD ["serve"]' in lines
    run = " ".join(line for line in lines if line.startswith("RUN "))
    assert "pip install" in run
    assert "-m 0700 /var/lib/relay" in run
    env = dict(re.findall(r"(RELAY_[A-Z_]+)=(\S+)", " ".join(line for line in lines if line.startswith("ENV "))))
    cfg = from_mapping({}, env)  # settings Relay accepts
    exposed = {int(p) for line in lines if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert {cfg.smtp.listen[0].port, cfg.http.listen.port} == exposed
    assert cfg.data_dir == Path("/var/lib/relay")


def _healthcheck_code() -> str:
    (line,) = [line for line in _dockerfile() if line.startswith("HEALTHCHECK ")]
    command = line.split(" CMD ", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"]
    return argv[2]


async def test_the_healthcheck_command_passes_on_a_running_relay_and_fails_without_one(tmp_path: Path) -> None:
    from helpers import make_config, running_relay

    code = _healthcheck_code()
    async with running_relay(make_config(tmp_path)) as relay:
        assert relay.http_address is not None
        port = relay.http_address.port
        env = {"PATH": os.environ["PATH"], "RELAY_HTTP_LISTEN": f"0.0.0.0:{port}"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env, stderr=asyncio.subprocess.DEVNULL)
    assert await asyncio.wait_for(proc.wait(), 20) != 0  # nothing listens there any more


def test_systemd_unit_verifies_and_runs_relay_serve(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks that ExecStart exists: the copy's ExecStart points at
    this checkout's own `relay` (the unit's /opt/relay/.venv is the documented install)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "relay.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.+)$", unit, re.M)
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/relay/.venv/bin/relay"
    from relay.cli import _parser

    args = _parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("serve", "/etc/relay/relay.toml")
    relay_bin = Path(sys.executable).parent / "relay"
    assert relay_bin.is_file()
    copy = tmp_path / "relay.service"
    copy.write_text(unit.replace(f"ExecStart={argv[0]}", f"ExecStart={relay_bin}"))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""  # no warning about any directive
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["User"] == "relay"
    assert settings["Restart"] == "on-failure"
    assert settings["KillSignal"] == "SIGTERM"
    assert int(settings["TimeoutStopSec"].removesuffix("s")) > 20  # [smtp] + [delivery] shutdown_grace
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["ReadWritePaths"] == "/var/lib/relay"
    assert settings["CapabilityBoundingSet"] == settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=50", str(copy)],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert security.returncode == 0, security.stdout[-2000:]
