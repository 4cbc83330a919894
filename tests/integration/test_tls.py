"""TLS to RabbitMQ and Redis, with certificates made for the test: verified, client certificates, fail closed.

One private node with an amqps listener that requires a client certificate, and one Redis with a TLS
port that requires one too; a CA of the test signs the servers' and the client's certificates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from sign_in_tokens_client.client import SignInTokenClient
from sign_in_tokens_client.contract.messages import Created

from service.local.rabbitmq import LocalBroker, TlsListener
from service.local.redis_server import LocalRedis
from tests.conftest import WorkerFactory
from tests.workers import WorkerProcesses


@dataclass(frozen=True)
class Pki:
    """The files: the CA, a CA that signed nothing here, the servers' and the client's."""

    ca: Path
    wrong_ca: Path
    server: TlsListener
    client_cert: Path
    client_key: Path

    def amqp_query(self, ca: Path | None = None) -> str:
        """The AMQP_URL query: CA, client certificate and key."""
        return f"cafile={ca or self.ca}&certfile={self.client_cert}&keyfile={self.client_key}"

    def redis_query(self, ca: Path | None = None) -> str:
        """The REDIS_URL query: CA, client certificate and key."""
        return f"ssl_ca_certs={ca or self.ca}&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for localhost, signed by a CA of this module's own."""
    base = tmp_path_factory.mktemp("pki")
    ca, wrong = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("sign-in-token-worker")
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    wrong.cert_pem.write_to_path(str(base / "wrong-ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(base / "server.pem"))
    server.private_key_pem.write_to_path(str(base / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(base / "client.pem"))
    client.private_key_pem.write_to_path(str(base / "client.key"))
    listener = TlsListener(base / "ca.pem", base / "server.pem", base / "server.key", require_client_cert=True)
    return Pki(base / "ca.pem", base / "wrong-ca.pem", listener, base / "client.pem", base / "client.key")


@pytest.fixture(scope="module")
async def tls_node(pki: Pki) -> AsyncIterator[LocalBroker]:
    """A private node with an amqps listener requiring client certificates."""
    async with LocalBroker(tls=pki.server) as node:
        yield node


@pytest.fixture(scope="module")
async def tls_redis(pki: Pki) -> AsyncIterator[LocalRedis]:
    """A private Redis with a TLS port requiring client certificates."""
    async with LocalRedis(tls=pki.server) as server:
        yield server


async def test_a_worker_over_tls_verifies_both_servers_and_answers(
    start_worker: WorkerFactory, tls_node: LocalBroker, tls_redis: LocalRedis, pki: Pki, queue_names: dict[str, str]
) -> None:
    """Amqps and rediss with the CA and a client certificate: the worker starts and a client over TLS gets a token."""
    amqps = tls_node.amqps_url(pki.amqp_query())
    worker = await start_worker(amqp_url=amqps, redis_url=tls_redis.tls_url(pki.redis_query()))
    assert worker.parts.upstream(None).clerk.limiter.shared
    async with SignInTokenClient(
        amqps, request_queue=queue_names["REQUEST_QUEUE"], bulk_queue=queue_names["BULK_QUEUE"]
    ) as client:
        assert isinstance(await client.request("user_over_tls"), Created)


@pytest.mark.parametrize("server", ["broker", "redis"])
async def test_a_wrong_ca_fails_closed_with_one_line(
    worker_processes: WorkerProcesses, tls_node: LocalBroker, tls_redis: LocalRedis, pki: Pki, server: str
) -> None:
    """A CA that did not sign the server's certificate: exit 2 at once, one line saying which and why."""
    amqps = tls_node.amqps_url(pki.amqp_query(pki.wrong_ca if server == "broker" else None))
    rediss = tls_redis.tls_url(pki.redis_query(pki.wrong_ca if server == "redis" else None))
    worker = worker_processes.spawn(AMQP_URL=amqps, REDIS_URL=rediss)
    assert worker.process.wait(30) == 2
    output = worker.log_path.read_text().strip()
    assert "\n" not in output, output
    variable = "AMQP_URL" if server == "broker" else "REDIS_URL"
    assert output.startswith(f"sign-in-tokens: configuration error: {variable}: the certificate of ")
    assert "did not verify (self-signed certificate in certificate chain)" in output


@pytest.mark.parametrize(
    ("server", "switch_off"),
    [
        # The spellings aiormq read as "off" (it verifies only for exactly 0), and redis-py's.
        *[("broker", f"no_verify_ssl={value}") for value in ("false", "no", "off", "2", "on", "+0", "0%20")],
        ("redis", "ssl_check_hostname=false"),
        ("redis", "ssl_cert_reqs=optional"),
        # Anonymous ciphers: a server with no certificate at all (redis-py takes any parameter).
        ("redis", "ssl_ciphers=aNULL%3A%40SECLEVEL%3D0"),
    ],
)
async def test_verification_cannot_be_switched_off_in_any_spelling(
    worker_processes: WorkerProcesses,
    tls_node: LocalBroker,
    tls_redis: LocalRedis,
    pki: Pki,
    server: str,
    switch_off: str,
) -> None:
    """A wrong CA and a parameter that would stop checking it: refused before any connection, one line, exit 2."""
    amqps = tls_node.amqps_url(pki.amqp_query(pki.wrong_ca if server == "broker" else None))
    rediss = tls_redis.tls_url(pki.redis_query(pki.wrong_ca if server == "redis" else None))
    if server == "broker":
        amqps += f"&{switch_off}"
    else:
        rediss += f"&{switch_off}"
    worker = worker_processes.spawn(AMQP_URL=amqps, REDIS_URL=rediss)
    assert worker.process.wait(30) == 2
    output = worker.log_path.read_text().strip()
    assert "\n" not in output, output
    variable = "AMQP_URL" if server == "broker" else "REDIS_URL"
    name = switch_off.split("=", 1)[0]
    if name == "ssl_ciphers":
        assert output.startswith(f"sign-in-tokens: configuration error: REDIS_URL: query parameter '{name}' is not")
    else:
        assert output.startswith(f"sign-in-tokens: configuration error: {variable}: {name}=")
        assert "would turn certificate verification off" in output
