"""deploy/prometheus: promtool checks the config and rules and runs their unit tests
(nmt.rules.test.yml); every metric the rules and the unit tests use is one server/metrics.py exports.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry

from nmt.server.config import ServerConfig
from nmt.server.metrics import LATENCY_BUCKETS, Metrics
from nmt.server.nmt_pb import translation_pb2 as pb

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES, RULE_TESTS, CONFIG = (PROMETHEUS / n for n in ("nmt.rules.yml", "nmt.rules.test.yml", "prometheus.yml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus, which ships it); the rules are not checked",
)
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
# Sample names of each metric type, as the text exposition writes them.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "summary": ("", "_sum", "_count", "_created"),
}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def rule(name: str) -> dict:
    (found,) = [r for r in rules() if name in (r.get("alert"), r.get("record"))]
    return found


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    families = list(registry.collect())
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]} | {
        s.name for f in families for s in f.samples
    }


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings and label matchers that are
    either recorded series (with a colon) or ours (nmt_*), plus `up`."""
    bare = re.sub(r'"[^"]*"', "", re.sub(r"\{[^}]*\}", "", expr))
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return {t for t in tokens if ":" in t or t.startswith("nmt_") or t == "up"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_checks_the_scrape_config() -> None:
    result = promtool("check", "config", CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_cover_every_rule() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    firing = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    evaluated = {
        name for case in tests["tests"] for t in case.get("promql_expr_test", []) for name in metric_names(t["expr"])
    }
    assert firing == {r["alert"] for r in rules() if "alert" in r}
    assert quiet <= firing  # the thresholds and `for` durations are tested on both sides
    assert evaluated >= {r["record"] for r in rules() if "record" in r}


def test_rules_use_only_exported_metrics() -> None:
    exported, recorded = exported_names(), {r["record"] for r in rules() if "record" in r}
    assert {"nmt_requests_total", "nmt_request_duration_seconds_bucket", "nmt_queue_sentences"} <= exported
    used = set().union(*(metric_names(r["expr"]) for r in rules()))
    unknown = {n for n in used if n not in exported and n not in recorded and n != "up"}
    assert not unknown, f"not exported by server/metrics.py nor recorded: {sorted(unknown)}"
    tests = yaml.safe_load(RULE_TESTS.read_text())
    series = {s["series"].split("{")[0] for case in tests["tests"] for s in case["input_series"]}
    assert series <= exported | {"up"}, f"unit-test series nmt-serve never exports: {sorted(series - exported)}"


def test_label_values_are_real() -> None:
    codes = re.search(r'code=~"([^"]+)"', rule("job:nmt_request_errors:ratio_rate5m")["expr"]).group(1)
    assert set(codes.split("|")) <= {c.name for c in grpc.StatusCode}
    methods = set(pb.DESCRIPTOR.services_by_name["TranslationService"].methods_by_name)
    tests = yaml.safe_load(RULE_TESTS.read_text())
    used = {
        m for case in tests["tests"] for s in case["input_series"] for m in re.findall(r'method="([^"]+)"', s["series"])
    }
    assert used and used <= methods


def test_thresholds_match_the_server() -> None:
    # The server does not export its limits: the rules assume nmt-serve's defaults.
    fill = rule("job:nmt_batch_fill:ratio5m")["expr"]
    assert re.search(r"/\s*(\d+)\s*$", fill).group(1) == str(DEFAULTS["max_batch_size"])
    queue = rule("NmtQueueNearFull")["expr"]
    assert re.search(r"\*\s*(\d+)\s*$", queue).group(1) == str(DEFAULTS["max_queue_size"])
    # A threshold on a bucket boundary is exact; inside a bucket histogram_quantile only interpolates.
    latency = float(re.search(r">\s*([0-9.]+)\s*$", rule("NmtHighP99Latency")["expr"]).group(1))
    assert latency in LATENCY_BUCKETS


def test_scrape_config_matches_the_server_and_the_rules() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == [RULES.name]
    (job,) = config["scrape_configs"]
    assert f'up{{job="{job["job_name"]}"}}' in rule("NmtInstanceDown")["expr"]
    (target,) = job["static_configs"][0]["targets"]
    assert int(target.rsplit(":", 1)[1]) == DEFAULTS["metrics_port"]
