"""The deployment files, checked as CI can check them without a container engine or a cluster.

- Dockerfile: hadolint;
- deploy/compose.yaml: the Compose Specification's JSON schema (check-jsonschema's copy);
- deploy/kubernetes/: the Kubernetes schemas (kubernetes-validate, strict), the KEDA and
  Prometheus Operator resources against their CRD schemas (the @kubernetes-models packages, with
  Node.js), and what the manifests say checked against the service's own settings and policy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings, load_settings
from service.policy import load_policy

ROOT = Path(__file__).parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
NODE_DIR = ROOT / "tests" / "interop" / "node"
KUBERNETES_VERSION = "1.30.0"
CUSTOM_GROUPS = ("keda.sh", "monitoring.coreos.com")


def tool(name: str) -> str:
    """A command installed in this environment (the dev dependencies)."""
    return str(Path(sys.executable).with_name(name))


def resources() -> list[dict[str, Any]]:
    """Every resource the kustomization lists."""
    listed = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    found = [doc for name in listed for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]
    assert found
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [r for r in resources() if r["kind"] == kind]


def test_hadolint_passes_the_dockerfile() -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)  # noqa: S603
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(  # noqa: S603 - a dev tool, fixed arguments
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "deploy" / "compose.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert compose["services"]["worker"]["deploy"]["replicas"] == 2
    key_file = ROOT / "deploy" / compose["secrets"]["clerk_secret_key"]["file"]
    assert key_file.read_text().startswith("sk_test_")  # a fake key, for the fake Clerk


def test_core_resources_pass_the_kubernetes_schemas_strictly() -> None:
    checked = 0
    for resource in resources():
        if resource["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            continue
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 6


def test_custom_resources_pass_their_crd_schemas() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the CRD schemas come in Node.js packages")
    if not (NODE_DIR / "node_modules" / "@kubernetes-models" / "keda").is_dir():
        pytest.skip(f"@kubernetes-models is not installed in {NODE_DIR}: run scripts/setup (npm ci) with node present")
    custom = [r for r in resources() if r["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    assert {r["kind"] for r in custom} == {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
    result = subprocess.run(  # noqa: S603 - our script
        [node, str(NODE_DIR / "validate-crds.mjs")],
        input=json.dumps(custom),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_manifests_agree_with_the_service(tmp_path: Path) -> None:
    """Settings and policy load; the grace period covers the shutdown; KEDA watches the queues the workers consume."""
    settings_map = next(r for r in of_kind("ConfigMap") if r["metadata"]["name"] == "sign-in-tokens-settings")["data"]
    policy_map = next(r for r in of_kind("ConfigMap") if r["metadata"]["name"] == "sign-in-tokens-policy")["data"]
    settings = load_settings({**settings_map, "CLERK_SECRET_KEY_FILE": ""})
    assert settings.shutdown_grace_seconds == 25
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy_map["policy.toml"])
    policy = load_policy(str(policy_file))
    assert set(policy.callers) == {"support-portal", "orders-service", "onboarding-job"}
    deployment = of_kind("Deployment")[0]["spec"]["template"]["spec"]
    assert deployment["terminationGracePeriodSeconds"] > settings.shutdown_grace_seconds
    assert deployment["automountServiceAccountToken"] is False
    container = deployment["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert (container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]) == (
        "/readyz",
        "/healthz",
    )
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(settings_map["CLERK_SECRET_KEY_FILE"]).parent) in mounts
    assert str(Path(settings_map["POLICY_FILE"]).parent) in mounts
    scaled = of_kind("ScaledObject")[0]["spec"]
    defaults = Settings()
    assert {t["metadata"]["queueName"] for t in scaled["triggers"]} == {
        defaults.request_queue,
        defaults.bulk_queue,
        defaults.revoke_queue,
    }
    assert scaled["minReplicaCount"] == 0
    rules = of_kind("PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    metrics = (ROOT / "service" / "health.py").read_text()
    for rule in rules:
        for name in ("sign_in_tokens_check", "sign_in_tokens_requests", "sign_in_tokens_rate_limit_waiting"):
            if name in rule["expr"]:
                assert f'"{name}"' in metrics, name
