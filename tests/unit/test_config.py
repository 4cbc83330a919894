"""Settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from sign_in_tokens_client.contract.errors import ConfigError

from service.config import effective, load_settings
from service.urls import masked_url


def test_defaults_are_the_contracts() -> None:
    """With nothing set, the contract's defaults apply."""
    settings = load_settings({})
    assert (settings.amqp_url, settings.clerk_api_url) == (
        "amqp://guest:guest@localhost:5672/",
        "https://api.clerk.com/v1",
    )
    assert (settings.request_queue, settings.bulk_queue) == ("sign_in_tokens.create", "sign_in_tokens.create.bulk")
    assert (settings.impersonation_queue, settings.revoke_queue) == (
        "sign_in_tokens.impersonate",
        "sign_in_tokens.revoke",
    )
    assert (settings.results_queue, settings.dead_letter_queue) == ("sign_in_tokens.results", "sign_in_tokens.dead")
    assert (settings.http_port, settings.max_attempts, settings.shutdown_grace_seconds) == (8080, 5, 25.0)
    assert (settings.startup_timeout_seconds, settings.idempotency_window_seconds) == (60.0, 600.0)
    assert settings.max_expires_in_seconds == 2_592_000


def test_key_file_is_read_and_never_printed(tmp_path: Path) -> None:
    """CLERK_SECRET_KEY_FILE supplies the key; the settings' repr masks it."""
    key_file = tmp_path / "key"
    key_file.write_text("sk_test_fromfile\n")
    settings = load_settings({"CLERK_SECRET_KEY_FILE": str(key_file)})
    assert settings.secret_key() == "sk_test_fromfile"
    assert "sk_test_fromfile" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HTTP_PORT": "x"}, "HTTP_PORT: Expected `int`"),
        ({"HTTP_PORT": "70000"}, "HTTP_PORT"),
        ({"AMQP_URL": "localhost:5672"}, "AMQP_URL: not a valid URL"),
        ({"CLERK_API_URL": "ftp://x"}, "CLERK_API_URL"),
        ({"CLERK_SECRET_KEY": "sk test"}, "CLERK_SECRET_KEY"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        (
            {"IMPERSONATION_QUEUE": "sign_in_tokens.create"},
            "IMPERSONATION_QUEUE: 'sign_in_tokens.create' is already REQUEST_QUEUE; each queue needs a name of its own",
        ),
        ({"RESULTS_QUEUE": "q", "DEAD_LETTER_QUEUE": "q"}, "DEAD_LETTER_QUEUE: 'q' is already RESULTS_QUEUE"),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], message: str) -> None:
    """Each bad value is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_missing_key_is_reported_when_required() -> None:
    """The worker's key check names both ways to give it."""
    with pytest.raises(ConfigError, match="CLERK_SECRET_KEY or CLERK_SECRET_KEY_FILE"):
        load_settings({}).secret_key()


@pytest.mark.parametrize(
    ("env", "concurrency"),
    [
        # A production key: 100 calls a second for 2 s of latency, which both lanes' prefetch can hold.
        ({"CLERK_SECRET_KEY": "sk_live_x"}, 200),
        # A development key: 10 a second would need 20; the floor is 32.
        ({"CLERK_SECRET_KEY": "sk_test_x"}, 32),
        # A limit far above the load: capped by what the worker can hold.
        ({"CLERK_RATE_LIMIT": "1000000", "PREFETCH": "50"}, 100),
        ({"CLERK_RATE_LIMIT": "1000000", "UPSTREAM_CONCURRENCY": "8"}, 8),
    ],
)
def test_upstream_concurrency_follows_the_rate_limit_unless_set(env: dict[str, str], concurrency: int) -> None:
    """Unset, UPSTREAM_CONCURRENCY is the limit's rate times Clerk's slowest planned answer, bounded."""
    assert load_settings(env).concurrency == concurrency


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqps://u:p@h/?cafile={missing}", "AMQP_URL: cafile {missing}: No such file or directory"),
        ("amqp://u:p@h/?cafile={ca}", "AMQP_URL: cafile is given but the scheme is amqp://, not amqps://"),
        (
            "amqps://u:p@h/?cafile={ca}&no_verify_ssl=1",
            (
                "AMQP_URL: no_verify_ssl='1' would turn certificate verification off (only no_verify_ssl=0 is accepted); "
                "give the CA instead"
            ),
        ),
    ],
)
def test_tls_settings_fail_closed_with_one_line(tmp_path: Path, url: str, message: str) -> None:
    """A CA file that is not there, a TLS file on a plain URL, verification turned off: refused at start."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    names = {"missing": str(tmp_path / "nope.pem"), "ca": str(ca)}
    with pytest.raises(ConfigError) as raised:
        load_settings({"AMQP_URL": url.format(**names)})
    assert str(raised.value) == message.format(**names)
    redis_off = {"REDIS_URL": f"rediss://h:6380/0?ssl_ca_certs={ca}&ssl_cert_reqs=none"}
    with pytest.raises(ConfigError, match="REDIS_URL: ssl_cert_reqs='none' would turn certificate verification off"):
        load_settings(redis_off)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        # aiormq verifies only for exactly 0: every other spelling turned it off.
        *[("AMQP_URL", f"amqps://u:p@h/?no_verify_ssl={v}") for v in ("false", "no", "off", "2", "on", "TRUE", "")],
        # aiormq compares the raw value: " 0", "0 ", "0\n", "\t0" are not "0" (verification off).
        *[("AMQP_URL", f"amqps://u:p@h/?no_verify_ssl={v}") for v in ("+0", "%200", "0%20", "0%0A", "%090", "00")],
        ("AMQP_URL", "amqps://u:p@h/?no_verify_ssl=0&no_verify_ssl=1"),
        ("AMQP_URL", "amqps://u:p@h/?ssl_cert_reqs=none"),
        *[("REDIS_URL", f"rediss://h:6380/0?ssl_check_hostname={v}") for v in ("false", "False", "0", "no", "n", "")],
        *[("REDIS_URL", f"rediss://h:6380/0?ssl_cert_reqs={v}") for v in ("none", "NONE", "optional", "0", "REQUIRED")],
        ("REDIS_URL", "rediss://h:6380/0?ssl_cert_reqs=required&ssl_cert_reqs=none"),
        ("REDIS_URL", "rediss://h:6380/0?no_verify_ssl=1"),
        ("CLERK_API_URL", "https://api.clerk.test/v1?ssl_check_hostname=false"),
    ],
)
def test_certificate_checks_cannot_be_switched_off_in_any_spelling(variable: str, url: str) -> None:
    """Any value but the safe one of no_verify_ssl, ssl_cert_reqs or ssl_check_hostname, on any URL: one line."""
    with pytest.raises(ConfigError) as raised:
        load_settings({variable: url})
    assert str(raised.value).startswith(f"{variable}: ")
    assert "would turn certificate verification off" in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("AMQP_URL", "amqps://u:p@h/?no_verify_ssl=0"),
        ("REDIS_URL", "rediss://h:6380/0?ssl_cert_reqs=required&ssl_check_hostname=True"),
        ("CLERK_API_URL", "http://127.0.0.1:8090/v1"),
        ("CLERK_API_URL", "http://localhost:8090/v1"),
        ("CLERK_API_URL", "http://[::1]:8090/v1"),
    ],
)
def test_the_safe_spellings_and_a_loopback_stand_in_are_accepted(variable: str, url: str) -> None:
    """The values that keep checks on, and an http:// Clerk on loopback (the fake one), start."""
    assert getattr(load_settings({variable: url}), variable.lower()) == url


def test_an_http_clerk_url_off_loopback_is_refused() -> None:
    """The secret key would travel in clear: http:// to anywhere but this machine is one line, exit 2."""
    with pytest.raises(ConfigError, match=r"^CLERK_API_URL: http:// sends the secret key in clear"):
        load_settings({"CLERK_API_URL": "http://api.clerk.com/v1"})


def test_the_broker_user_is_the_urls_or_amqp_user() -> None:
    """Replies carry the worker's broker user: the URL's, AMQP_USER where it logs in with EXTERNAL."""
    assert load_settings({"AMQP_URL": "amqp://svc:pw@h/"}).broker_user == "svc"
    assert load_settings({"AMQP_URL": "amqp://h/"}).broker_user == "guest"  # aiormq's default login
    external = "amqps://h/?auth=external"
    with pytest.raises(ConfigError, match=r"^AMQP_USER: AMQP_URL logs in with auth=external"):
        load_settings({"AMQP_URL": external})
    assert load_settings({"AMQP_URL": external, "AMQP_USER": "O=client,CN=svc"}).broker_user == "O=client,CN=svc"


@pytest.mark.parametrize(
    "parameter",
    ["ssl_ciphers=aNULL%3A%40SECLEVEL%3D0", "ssl_min_version=769", "socket_timeout=600", "retry_on_timeout=true"],
)
def test_redis_url_takes_only_the_parameters_the_service_knows(parameter: str) -> None:
    """redis-py hands any query parameter to its connections: anonymous ciphers, or no stall detection."""
    with pytest.raises(ConfigError) as raised:
        load_settings({"REDIS_URL": f"rediss://h:6380/0?{parameter}"})
    name = parameter.split("=", 1)[0]
    assert str(raised.value).startswith(f"REDIS_URL: query parameter '{name}' is not accepted (only db, ")


def test_config_shows_every_setting_with_secrets_masked(tmp_path: Path) -> None:
    """`sign-in-tokens config`'s rows: passwords in URLs and the key masked, defaults marked."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load_settings(
        {
            "AMQP_URL": f"amqps://svc:hunter2@rabbit:5671/?cafile={ca}",
            "REDIS_URL": "rediss://redis:6380/0?password=s3cret&ssl_password=k3ypass&db=1",
            "CLERK_API_URL": "https://proxy:pr0xypass@clerk-proxy.internal/v1?token=t0ken&api_key=apik3y",
            "CLERK_SECRET_KEY": "sk_live_abcdef0123456789",
        }
    )
    rows = {name: (shown, default) for name, shown, default in effective(settings)}
    assert rows["AMQP_URL"] == (f"amqps://svc:********@rabbit:5671/?cafile={ca}", False)
    assert rows["REDIS_URL"] == ("rediss://redis:6380/0?password=********&ssl_password=********&db=1", False)
    assert rows["CLERK_API_URL"] == (
        "https://proxy:********@clerk-proxy.internal/v1?token=********&api_key=********",
        False,
    )
    assert rows["CLERK_SECRET_KEY"] == ("sk_live_********", False)
    assert rows["PREFETCH"] == ("200", True)
    text = repr(rows)
    secrets = ("hunter2", "s3cret", "k3ypass", "pr0xypass", "t0ken", "apik3y", "abcdef0123456789")
    assert not any(secret in text for secret in secrets)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rediss://h:6380/0?pw=hunter2&db=1", "rediss://h:6380/0?pw=********&db=1"),
        ("https://api.clerk.test/v1?jwt=eyJhbGci&x=1", "https://api.clerk.test/v1?jwt=********&x=********"),
        ("https://tok_abc123@api.clerk.test/v1", "https://********@api.clerk.test/v1"),
        ("rediss://s3cret@h:6380/0", "rediss://********@h:6380/0"),
        ("amqps://sign-in-tokens@rabbit/?auth=external", "amqps://sign-in-tokens@rabbit/?auth=external"),
    ],
)
def test_every_credential_of_a_url_is_masked_whatever_its_name(url: str, shown: str) -> None:
    """Only the libraries' public parameters show; a user without a password is a token but in AMQP."""
    assert masked_url(url) == shown
