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
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings, load_settings
from service.trust.policy import load_policy

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


def version() -> str:
    """The project's version: the image's one tag."""
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def secret_value(name: str, key: str) -> str:
    """A value of a Secret of secret.yaml."""
    secret = next(r for r in of_kind("Secret") if r["metadata"]["name"] == name)
    return str(secret["stringData"][key])


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


def test_the_compose_file_runs_as_the_service_accepts(tmp_path: Path) -> None:
    """Each service's environment loads; the workers reach the http:// fake Clerk on loopback; no port clashes."""
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    key_file = ROOT / "deploy" / compose["secrets"]["clerk_secret_key"]["file"]
    assert key_file.read_text().startswith("sk_test_")  # a fake key, for the fake Clerk
    image = services["worker"]["image"]
    assert image == f"sign-in-token-service:{version()}"
    for name in ("worker", "request"):
        service = services[name]
        assert service["image"] == image
        environ = {**service["environment"], "CLERK_SECRET_KEY_FILE": str(key_file)}
        settings = load_settings(environ)  # an http:// Clerk URL off loopback would be refused here
        assert settings.clerk_api_url.startswith("http://127.0.0.1:")
        assert service.get("network_mode") == "service:fake-clerk" or name == "request"
    worker = services["worker"]
    assert "replicas" not in worker.get("deploy", {})  # two would share one network namespace's port 8080
    processes = int(worker["command"][worker["command"].index("--processes") + 1])
    assert processes == 2
    assert worker["environment"]["REDIS_URL"]  # processes share the rate limit through Redis
    fake = services["fake-clerk"]["command"]
    assert fake[fake.index("--host") + 1] == "127.0.0.1"
    assert f":{fake[fake.index('--port') + 1]}/" in worker["environment"]["CLERK_API_URL"]
    # The request tool reaches the workers' fake Clerk only through them; it needs no Clerk at all.
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))


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
    settings = load_settings({**settings_map, "CLERK_SECRET_KEY_FILE": "", "REPLY_SEALING_KEY_FILE": ""})
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
    assert str(Path(settings_map["REPLY_SEALING_KEY_FILE"]).parent) in mounts
    scaled = of_kind("ScaledObject")[0]["spec"]
    defaults = Settings()
    assert {t["metadata"]["queueName"] for t in scaled["triggers"]} == {
        defaults.request_queue,
        defaults.bulk_queue,
        defaults.impersonation_queue,
        defaults.revoke_queue,
    }
    assert scaled["minReplicaCount"] == 2
    rules = of_kind("PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    metrics = (ROOT / "service" / "worker" / "health.py").read_text()
    for rule in rules:
        for name in ("sign_in_tokens_check", "sign_in_tokens_requests", "sign_in_tokens_rate_limit_waiting"):
            if name in rule["expr"]:
                assert f'"{name}"' in metrics, name


def test_one_tag_set_in_one_place() -> None:
    """The Deployment names the image without a tag; the kustomization sets the project's version."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "sign-in-token-service", "newTag": version()}]
    (container,) = of_kind("Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "sign-in-token-service"
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert f"sign-in-token-service:{version()}" in operations
    assert "sign-in-token-service:latest" not in operations


def test_the_replica_floor_agrees_everywhere() -> None:
    """Two at least, owned by KEDA's HPA: no `replicas` a re-apply would reset; the PDB keeps one serving."""
    deployment = of_kind("Deployment")[0]["spec"]
    assert "replicas" not in deployment  # kubectl apply leaves an absent field to the HPA
    scaled = of_kind("ScaledObject")[0]["spec"]
    assert scaled["minReplicaCount"] == 2
    assert scaled["maxReplicaCount"] >= scaled["minReplicaCount"]
    assert "cooldownPeriod" not in scaled  # KEDA applies it only when scaling to zero
    budget = of_kind("PodDisruptionBudget")[0]["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert "minReplicaCount: 2" in operations
    assert "down to zero" not in operations


# The parameters KEDA's RabbitMQ scaler reads from a TriggerAuthentication (KEDA 2.16 docs,
# "RabbitMQ Queue", Authentication Parameters).
KEDA_RABBITMQ_PARAMETERS = frozenset(
    {"host", "username", "password", "tls", "ca", "cert", "key", "keyPassword", "unsafeSsl"}
)


def test_keda_reaches_the_broker_over_tls_with_its_own_fields() -> None:
    """KEDA ignores TLS options in a URL: its host has none; `tls: enable` and the broker's CA as `ca`."""
    (auth,) = of_kind("TriggerAuthentication")
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) <= KEDA_RABBITMQ_PARAMETERS
    values = {parameter: secret_value(r["name"], r["key"]) for parameter, r in refs.items()}
    assert values["host"].startswith("amqps://")
    assert "?" not in values["host"]
    assert values["tls"] == "enable"
    assert "BEGIN CERTIFICATE" in values["ca"]
    for trigger in of_kind("ScaledObject")[0]["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert trigger["metadata"]["protocol"] == "amqp"
    worker_url = secret_value("sign-in-tokens-connections", "amqp-url")
    assert values["host"] == worker_url.split("?")[0]  # the same broker and vhost as the workers


def test_the_workers_connections_load_with_the_mounted_ca(tmp_path: Path) -> None:
    """The secret's URLs pass the service's checks, their CA files are where the Deployment mounts the CA."""
    spec = of_kind("Deployment")[0]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    ca_mount = next(
        path
        for name, path in mounts.items()
        if volumes[name].get("secret", {}).get("secretName") == "sign-in-tokens-broker-ca"
    )
    amqp_url = secret_value("sign-in-tokens-connections", "amqp-url")
    redis_url = secret_value("sign-in-tokens-connections", "redis-url")
    local_ca = tmp_path / "ca.crt"
    local_ca.write_text(secret_value("sign-in-tokens-broker-ca", "ca.crt"))
    for url, parameter in ((amqp_url, "cafile"), (redis_url, "ssl_ca_certs")):
        path = url.split(f"{parameter}=")[1].split("&")[0]
        assert path == f"{ca_mount}/ca.crt"
    settings = load_settings(
        {
            "AMQP_URL": amqp_url.replace(f"{ca_mount}/ca.crt", str(local_ca)),
            "REDIS_URL": redis_url.replace(f"{ca_mount}/ca.crt", str(local_ca)),
            "CLERK_SECRET_KEY": "sk_live_" + "k" * 32,
        }
    )
    assert settings.amqp_url.startswith("amqps://")
    assert settings.redis_url is not None
    assert settings.redis_url.startswith("rediss://")
