"""docker/k8s without a cluster: every overlay renders with `kubectl kustomize`, every object is valid
for Kubernetes (kubernetes-validate) or for its CRD (tests/k8s_schemas), every container command is
one the CLI accepts, and the rules, the dashboard and the autoscalers name metrics, labels and
ports that the code serves."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from scheduler import observability
from scheduler.cli import main
from scheduler.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
SCHEMAS = ROOT / "tests" / "k8s_schemas"
OVERLAYS = ("sql", "redis", "rabbitmq")
#: Kubernetes version the objects are validated for (kubernetes-validate's schemas)
KUBERNETES_VERSION = "1.30.0"
#: schemas of the custom resources, by kind
CRD_SCHEMAS = {
    "ScaledObject": "scaledobject.json",
    "PodMonitor": "podmonitor.json",
    "PrometheusRule": "prometheusrule.json",
}
#: labels a query may use that the code does not set: the scrape's own (Prometheus, the PodMonitor)
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "container"}
#: PromQL words that look like metric names in an expression
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "max", "min", "sum", "count", "avg", "rate", "increase", "absent", "time", "histogram_quantile",
    "humanizeDuration", "le", "up", "s", "m", "h",
}  # fmt: skip


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        message = "kubectl is not installed (scripts/services.sh installs Debian's kubernetes-client)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@functools.cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run([kubectl(), "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def objects(path: str, kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in render(path) if doc["kind"] == kind}


def containers(path: str) -> list[dict[str, Any]]:
    workloads = [*objects(path, "Deployment").values(), *objects(path, "Job").values()]
    return [c for w in workloads for c in w["spec"]["template"]["spec"]["containers"]]


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["order-timeouts", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_whole_deployment_and_every_object_is_valid(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    kinds = sorted(doc["kind"] for doc in docs)
    assert {"Deployment", "Job", "ConfigMap", "Secret", "PodDisruptionBudget", "ScaledObject", "PodMonitor"} <= set(
        kinds
    )
    assert "PrometheusRule" in kinds
    for doc in docs:
        assert doc["metadata"].get("namespace") == "order-timeouts", doc["metadata"]["name"]
        if doc["kind"] in CRD_SCHEMAS:
            schema = json.loads((SCHEMAS / CRD_SCHEMAS[doc["kind"]]).read_text())
            jsonschema.validate(doc, schema)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    broker = objects(f"overlays/{overlay}", "Secret")["order-timeouts-broker"]["stringData"][
        "ORDER_TIMEOUTS_BROKER_URL"
    ]
    assert broker.split(":", 1)[0] == {"sql": "sql", "redis": "rediss", "rabbitmq": "amqps"}[overlay]


def test_the_hpa_alternative_is_valid_and_scales_the_workers_on_the_same_metric_as_keda() -> None:
    (hpa,) = render("autoscaling/hpa")
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    (keda,) = objects("overlays/redis", "ScaledObject").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == keda["spec"]["scaleTargetRef"]["name"] == "order-timeouts-worker"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, keda["spec"]["maxReplicaCount"])
    assert keda["spec"]["minReplicaCount"] == 1
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "order_timeouts_overdue"
    assert metric["external"]["target"]["averageValue"] == keda["spec"]["triggers"][0]["metadata"]["threshold"]
    query = keda["spec"]["triggers"][0]["metadata"]["query"]
    assert "order_timeouts_overdue{" in query and 'job="order-timeouts-maintain"' in query


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_command_is_a_valid_cli_invocation(
    overlay: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for container in containers(f"overlays/{overlay}"):
        assert "command" not in container, "the image's entry point is the console script"
        # --help after the real arguments: the CLI parses them all, then prints help instead of running.
        assert run_cli([*container["args"], "--help"], monkeypatch) == 0, capsys.readouterr().err


def test_workers_and_maintain_are_hardened_and_stop_cleanly() -> None:
    deployments = objects("overlays/redis", "Deployment")
    worker, maintain = deployments["order-timeouts-worker"], deployments["order-timeouts-maintain"]
    assert maintain["spec"]["replicas"] == 2, "the leases make two safe"
    for workload in [*deployments.values(), *objects("overlays/redis", "Job").values()]:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert set(container["resources"]) == {"requests", "limits"}
    # SIGTERM finishes the batch: the grace period is above the longest batch a worker can be in,
    # which the liveness bound also is (observability.STUCK_AFTER_S).
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > observability.STUCK_AFTER_S
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    port = container["args"][container["args"].index("--metrics-port") + 1]
    assert container["ports"] == [{"name": "metrics", "containerPort": int(port)}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    (pdb,) = (p for p in objects("overlays/redis", "PodDisruptionBudget").values() if "worker" in p["metadata"]["name"])
    assert pdb["spec"]["selector"]["matchLabels"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()


def test_the_settings_are_variables_the_code_reads_with_values_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    data = objects("overlays/sql", "ConfigMap")["order-timeouts-settings"]["data"]
    config_source = (ROOT / "scheduler" / "config.py").read_text()
    for name, value in data.items():
        assert f'"{name}"' in config_source, f"{name} is not read by scheduler/config.py"
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()  # a value the code refuses raises ConfigurationError here
    assert settings.max_attempts == int(data["ORDER_TIMEOUTS_MAX_ATTEMPTS"])
    assert settings.retention is not None and settings.retention.days == 7


def promql(expression: str) -> tuple[set[str], set[str]]:
    """Metric names and label names an expression uses (templates like $namespace aside)."""
    text = re.sub(r'"[^"]*"', '""', expression)  # label values and strings
    labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", text))
    labels |= {n.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text) for n in group.split(",")}
    text = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    names = {word for word in re.findall(r"[a-zA-Z_:][\w:]*", text) if word not in PROMQL_WORDS}
    return names, labels - {""}


def served_metrics() -> set[str]:
    """Every metric name the code exports, with the series a histogram or counter adds."""
    source = "".join((ROOT / "scheduler" / f).read_text() for f in ("observability.py",))
    base = set(re.findall(r'"(order_timeouts_\w+)"', source))
    return base | {f"{name}_{suffix}" for name in base for suffix in ("bucket", "count", "sum")}


def served_labels() -> set[str]:
    source = (ROOT / "scheduler" / "observability.py").read_text()
    return {"le"} | {
        label for group in re.findall(r'\[("\w+"(?:,\s*"\w+")*)\]', source) for label in re.findall(r'"(\w+)"', group)
    }


def rule_file() -> dict[str, Any]:
    data = yaml.safe_load((K8S / "monitoring" / "order-timeouts.rules.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_alerts_dashboard_and_autoscalers_name_only_metrics_and_labels_the_code_serves() -> None:
    metrics, labels = served_metrics(), served_labels() | SCRAPE_LABELS
    assert {"outcome", "task"} <= labels
    expressions = [rule["expr"] for group in rule_file()["groups"] for rule in group["rules"]]
    dashboard = json.loads((K8S / "monitoring" / "order-timeouts.dashboard.json").read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [
        doc["spec"]["triggers"][0]["metadata"]["query"] for doc in objects("overlays/sql", "ScaledObject").values()
    ]
    for expression in expressions:
        names, used = promql(expression)
        assert names <= metrics, f"{names - metrics} in {expression!r}"
        assert used <= labels, f"{used - labels} in {expression!r}"
    alerts = {rule["alert"] for group in rule_file()["groups"] for rule in group["rules"]}
    for needed in ("OverdueLag", "Dead", "RegistryDown", "NoWorker", "RelayBehind", "PurgeBehind"):
        assert f"OrderTimeouts{needed}" in alerts
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for needed in ("pending", "next hour", "overdue lag", "outcomes per second", "lateness", "dead"):
        assert needed in titles


def test_compose_prometheus_and_the_prometheus_rule_load_the_same_alerts() -> None:
    (rule,) = objects("overlays/rabbitmq", "PrometheusRule").values()
    assert rule["spec"]["groups"] == rule_file()["groups"]
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["prometheus"]["volumes"])
    for rules in prometheus["rule_files"]:
        source = next(host for host, inside in mounts.items() if inside == rules)
        assert (ROOT / "docker" / source).resolve() == K8S / "monitoring" / "order-timeouts.rules.yml"
    # The job names the rules use are the compose jobs' and the PodMonitor's alike.
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    (monitor,) = objects("overlays/rabbitmq", "PodMonitor").values()
    (relabel,) = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    components = {
        w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for w in objects("overlays/rabbitmq", "Deployment").values()
    }
    assert {relabel["replacement"].replace("$1", c) for c in components} == jobs
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
