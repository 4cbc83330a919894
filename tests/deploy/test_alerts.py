"""The PrometheusRules fire when they should, on the series the worker really exports.

Each alert of deploy/kubernetes/prometheusrule.yaml has cases here: input series as a scrape of
the workers would hold them (the labels Prometheus adds: namespace, pod), when it must fire and
when it must not. The cases become a ``promtool test rules`` file (the annotations expected are
the rule's own), run against the rules extracted from the PrometheusRule. A live check then
starts a real worker (with Redis) and asserts that every input series of the cases is in its
/metrics from the start, with those names and labels: a rule tested on a series the worker does
not export would be a rule that never fires.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.local.fake_clerk import FakeClerk
from tests.conftest import SECRET_KEY, WorkerFactory

RULES = Path(__file__).parents[2] / "deploy" / "kubernetes" / "prometheusrule.yaml"
# ``instance`` is the worker's own (the Clerk instance): the ServiceMonitor honours it.
SCRAPE_LABELS = frozenset({"namespace", "pod", "job"})
NS = 'namespace="sign-in-tokens"'


@dataclass
class Case:
    """An alert, the series it sees, and the times at which it must (or must not) fire."""

    alert: str
    why: str
    series: dict[str, str]
    fires_at: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    quiet_at: list[str] = field(default_factory=list)


def pod(name: str, labels: str = "") -> str:
    """``name`` as scraped from pod ``worker-a`` with ``labels`` (a Prometheus label list)."""
    extra = f",{labels}" if labels else ""
    return f'{name}{{{NS},pod="worker-a"{extra}}}'


def pod_b(name: str, labels: str = "") -> str:
    """The same series scraped from a second pod."""
    return pod(name, labels).replace('pod="worker-a"', 'pod="worker-b"')


NAMESPACE = {"namespace": "sign-in-tokens"}


def broker_down(name: str, values: str = "1 0x10") -> dict[str, str]:
    """A pod whose broker connection is lost (not consuming), every other check passing."""
    checks = {"consuming": values, "upstream_available": "1x15", "key_ok": "1x15"}
    return {
        pod("sign_in_tokens_check", f'check="{check}"').replace('pod="worker-a"', f'pod="{name}"'): v
        for check, v in checks.items()
    }


CASES = [
    Case(
        "SignInTokensKeyRejected",
        "key_ok failed on one worker for 2 minutes (one key: the instance default)",
        {
            pod("sign_in_tokens_instance_check", 'check="key_ok",instance="default"'): "1 1 0x10",
            pod_b("sign_in_tokens_instance_check", 'check="key_ok",instance="default"'): "1x12",
        },
        fires_at={"5m": [{**NAMESPACE, "instance": "default"}]},
        quiet_at=["3m"],
    ),
    Case(
        "SignInTokensKeyRejected",
        "one instance's key rejected, the other's accepted: the alert names the one",
        {
            pod("sign_in_tokens_instance_check", 'check="key_ok",instance="staging"'): "1 0x10",
            pod("sign_in_tokens_instance_check", 'check="key_ok",instance="prod"'): "1x11",
            pod("sign_in_tokens_check", 'check="key_ok"'): "1x11",
        },
        fires_at={"4m": [{**NAMESPACE, "instance": "staging"}]},
        quiet_at=["1m"],
    ),
    Case(
        "SignInTokensClerkUnavailable",
        "Clerk unavailable for 5 minutes",
        {pod("sign_in_tokens_instance_check", 'check="upstream_available",instance="default"'): "1 0x10"},
        fires_at={"7m": [{**NAMESPACE, "instance": "default"}]},
        quiet_at=["4m"],
    ),
    Case(
        "SignInTokensDeadLettersGrowing",
        "the first dead letter after a start (the series is exported at 0 from the start)",
        {pod("sign_in_tokens_requests_total", 'lane="bulk",outcome="dead_lettered",instance="-"'): "0 0 1x30"},
        fires_at={"3m": [NAMESPACE]},
        quiet_at=["1m", "20m"],
    ),
    Case(
        "SignInTokensDeadLettersGrowing",
        "a revocation dead-lettered",
        {pod("sign_in_tokens_requests_total", 'lane="revoke",outcome="dead_lettered",instance="prod"'): "0 0 0 2x30"},
        fires_at={"4m": [NAMESPACE]},
        quiet_at=["2m"],
    ),
    Case(
        "SignInTokensHeldAtRateLimit",
        "requests waiting for Clerk's limit for 30 minutes",
        {pod("sign_in_tokens_rate_limit_waiting", 'lane="bulk",instance="staging"'): "0 5x40"},
        fires_at={"32m": [NAMESPACE]},
        quiet_at=["20m"],
    ),
    Case(
        "SignInTokensRedisUnavailable",
        "the idempotency store's Redis gone while the rate limit still says 1",
        {
            pod("sign_in_tokens_check", 'check="idempotency_store_available"'): "1 0x10",
            pod("sign_in_tokens_check", 'check="rate_limit_available"'): "1x11",
        },
        fires_at={"4m": [NAMESPACE]},
        quiet_at=["2m"],
    ),
    Case(
        "SignInTokensRedisUnavailable",
        "the rate limit's Redis gone",
        {
            pod("sign_in_tokens_check", 'check="idempotency_store_available"'): "1x11",
            pod("sign_in_tokens_check", 'check="rate_limit_available"'): "1 0x10",
        },
        fires_at={"4m": [NAMESPACE]},
    ),
    Case(
        "SignInTokensAuditUnconfirmed",
        "an audit event the broker did not confirm",
        {pod("sign_in_tokens_audit_unconfirmed_total"): "0 0 1x20"},
        fires_at={"3m": [NAMESPACE]},
        quiet_at=["1m", "15m"],
    ),
    Case(
        "SignInTokensUnheldTokens",
        "a create cut after it was sent",
        {pod("sign_in_tokens_ambiguous_creates_total"): "0 0 1x70"},
        fires_at={"3m": [NAMESPACE]},
        quiet_at=["1m", "65m"],
    ),
    Case(
        "SignInTokensUnheldTokens",
        "a token stopped before it was stored",
        {pod("sign_in_tokens_unsettled_tokens_total", 'reason="stopped_before_stored"'): "0 1x10"},
        fires_at={"2m": [NAMESPACE]},
    ),
    Case(
        "SignInTokensWorkersAbsent",
        "no worker scraped for 5 minutes (a series stays 5 minutes after its last scrape)",
        {pod("sign_in_tokens_ready"): "1 1 _x14"},
        fires_at={"12m": [NAMESPACE]},
        quiet_at=["1m", "9m"],
    ),
    Case(
        "SignInTokensWorkersAbsent",
        "another environment's workers, scraped by the same Prometheus, do not hide the outage",
        {
            pod("sign_in_tokens_ready"): "1 1 _x14",
            'sign_in_tokens_ready{namespace="staging",pod="worker-s"}': "1x16",
        },
        fires_at={"12m": [NAMESPACE]},
    ),
    Case(
        "SignInTokensNoWorkerReady",
        "both workers not ready for 2 minutes, the broker the cause",
        {
            pod("sign_in_tokens_ready"): "1 0x10",
            pod_b("sign_in_tokens_ready"): "1 0x10",
            **broker_down("worker-a"),
            **broker_down("worker-b"),
        },
        fires_at={"4m": [NAMESPACE]},
        quiet_at=["2m"],
    ),
    Case(
        "SignInTokensNoWorkerReady",
        "one of two workers not ready: the other serves",
        {pod("sign_in_tokens_ready"): "0x15", pod_b("sign_in_tokens_ready"): "1x15", **broker_down("worker-a", "0x15")},
        quiet_at=["5m", "12m"],
    ),
    Case(
        "SignInTokensNoWorkerReady",
        "Clerk down: SignInTokensClerkUnavailable alone speaks, after its own 5 minutes",
        {
            pod("sign_in_tokens_ready"): "1 0x10",
            pod("sign_in_tokens_check", 'check="upstream_available"'): "1 0x10",
            pod("sign_in_tokens_check", 'check="consuming"'): "1 0x10",
        },
        quiet_at=["4m", "8m"],
    ),
    Case(
        "SignInTokensWorkerNotReady",
        "one worker not ready for 10 minutes, the broker the cause",
        {pod("sign_in_tokens_ready"): "0x15", pod_b("sign_in_tokens_ready"): "1x15", **broker_down("worker-a", "0x15")},
        fires_at={"12m": [{**NAMESPACE, "pod": "worker-a"}]},
        quiet_at=["5m"],
    ),
    Case(
        "SignInTokensWorkerNotReady",
        "one worker's Redis lost: SignInTokensRedisUnavailable speaks",
        {
            pod("sign_in_tokens_ready"): "0x15",
            pod("sign_in_tokens_check", 'check="idempotency_store_available"'): "0x15",
            pod_b("sign_in_tokens_ready"): "1x15",
        },
        quiet_at=["12m"],
    ),
]


def rules() -> dict[str, dict[str, Any]]:
    """Every rule of the PrometheusRule, by alert name."""
    resource = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in resource["spec"]["groups"] for rule in group["rules"]}


def promtool_tests() -> dict[str, Any]:
    """The cases as a promtool unit test file (the expected annotations are the rule's own)."""
    by_name = rules()
    tests = []
    for case in CASES:
        rule = by_name[case.alert]
        checks = [
            {
                "eval_time": at,
                "alertname": case.alert,
                "exp_alerts": [
                    {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": rule["annotations"]}
                    for labels in expected
                ],
            }
            for at, expected in case.fires_at.items()
        ]
        checks += [{"eval_time": at, "alertname": case.alert, "exp_alerts": []} for at in case.quiet_at]
        tests.append(
            {
                "name": f"{case.alert}: {case.why}",
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                "alert_rule_test": checks,
            }
        )
    return {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}


def test_every_alert_has_a_case_that_fires_it() -> None:
    fired = {case.alert for case in CASES if case.fires_at}
    assert fired == set(rules())


def test_every_rule_fires_and_stays_quiet_as_promtool_evaluates_it(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; scripts/setup installs it as root)")
    resource = yaml.safe_load(RULES.read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": resource["spec"]["groups"]}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(promtool_tests(), sort_keys=False))
    checked = subprocess.run(  # noqa: S603 - promtool from PATH, fixed arguments
        [promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(  # noqa: S603 - promtool from PATH, fixed arguments
        [promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _scraped_form(series: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """A case's input series as the worker itself exports it (without the labels a scrape adds)."""
    match = re.fullmatch(r"([a-z_]+)\{(.*)\}", series)
    assert match, series
    labels = dict(re.findall(r'([a-z_]+)="([^"]*)"', match.group(2)))
    return match.group(1), frozenset((k, v) for k, v in labels.items() if k not in SCRAPE_LABELS)


async def test_every_series_the_cases_use_is_exported_from_the_start(
    start_worker: WorkerFactory, redis_url: str, fake_clerk: FakeClerk, tmp_path: Path
) -> None:
    """A worker of three Clerk instances, named as the cases name them."""
    instances = tmp_path / "instances.toml"
    instances.write_text(
        "".join(
            f'[instances.{name}]\nsecret_key = "{SECRET_KEY}{name}"\napi_url = "{fake_clerk.url}"\n'
            for name in ("default", "prod", "staging")
        )
    )
    worker = await start_worker(REDIS_URL=redis_url, CLERK_INSTANCES_FILE=str(instances))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{worker.health.port}/metrics") as response,
    ):
        text = await response.text()
    exported = {
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    wanted = {_scraped_form(series) for case in CASES for series in case.series}
    assert wanted - exported == set()
    names = {name for name, _ in exported}
    for rule in rules().values():
        for name in re.findall(r"sign_in_tokens_[a-z_]+", rule["expr"]):
            assert name in names, f"{rule['alert']} uses {name}, which the worker does not export"
