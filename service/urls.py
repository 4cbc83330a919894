"""The URLs the service is given: what each may say (TLS verification never off), and how each is shown (masked)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Final

from sign_in_tokens_client.contract.errors import ConfigError
from yarl import URL

MASK = "********"


# redis-py hands every query parameter of REDIS_URL to its connections (ssl_ciphers=aNULL would take
# a server with no certificate; socket_timeout would undo the service's own): only these are taken.
REDIS_URL_PARAMETERS: Final = (
    "db",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_ca_data",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "username",
    "password",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "client_name",
    "protocol",
)


# Query parameters shown in the clear by ``masked_url``: the libraries' own names for files, checks and
# tuning. Every other value is masked (a password, a token, a signature, whatever its name).
_PUBLIC_PARAMETERS = frozenset(
    {
        "cafile",
        "capath",
        "certfile",
        "keyfile",
        "no_verify_ssl",
        "auth",
        "heartbeat",
        "timeout",
        "name",
        *(parameter for parameter in REDIS_URL_PARAMETERS if "password" not in parameter),
    }
)


def masked_url(url: str) -> str:
    """``url`` with every credential masked: the password, and query parameters that carry secrets.

    A user without a password is masked too, except in an AMQP URL (there it is the broker user,
    logging in with a client certificate): elsewhere it is a token written where a user goes.
    Host, path and the libraries' public parameters are shown as given.
    """
    try:
        parsed = URL(url)
    except ValueError:
        return MASK
    if parsed.password:
        parsed = parsed.with_password(MASK)
    elif parsed.user and parsed.scheme not in ("amqp", "amqps"):
        parsed = parsed.with_user(MASK)
    query = [(name, value if name in _PUBLIC_PARAMETERS else MASK) for name, value in parsed.query.items()]
    if query != list(parsed.query.items()):
        parsed = parsed.with_query(query)
    return str(parsed)


def check_url(name: str, value: str, schemes: tuple[str, ...]) -> None:
    """ConfigError unless ``value`` is a URL of one of ``schemes`` naming a host."""
    try:
        url = URL(value)
    except ValueError:
        url = URL()
    if url.scheme not in schemes or not url.host:
        allowed = " or ".join(f"{s}://" for s in schemes)
        msg = f"{name}: not a valid URL (expected {allowed}host...)"
        raise ConfigError(msg)


# The TLS files each URL takes in its query (aiormq's and redis-py's own names).
_TLS_FILES = {
    "AMQP_URL": ("amqps", ("cafile", "capath", "certfile", "keyfile")),
    "REDIS_URL": ("rediss", ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")),
}


# The parameters that could turn certificate checks off, and the one value each may have, compared
# as the library compares it: aiormq verifies only for ``no_verify_ssl`` exactly ``0`` (" 0" turns it
# off); redis-py takes ``ssl_cert_reqs`` exactly ``required`` and ``ssl_check_hostname`` true in any
# case. Checked on every URL, whatever its scheme: a check cannot be switched off in any spelling.
_VERIFY_ON: dict[str, Callable[[str], bool]] = {
    "no_verify_ssl": lambda value: value == "0",
    "ssl_cert_reqs": lambda value: value == "required",
    "ssl_check_hostname": lambda value: value.lower() == "true",
}


_SAFE_SPELLING = {"no_verify_ssl": "0", "ssl_cert_reqs": "required", "ssl_check_hostname": "true"}


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def check_tls(name: str, value: str) -> None:
    """TLS files that exist and can be read, on a TLS scheme, with verification left on (fail closed)."""
    url = URL(value)
    scheme, files = _TLS_FILES[name]
    for parameter in files:
        path = url.query.get(parameter)
        if path is None:
            continue
        if url.scheme != scheme:
            msg = f"{name}: {parameter} is given but the scheme is {url.scheme}://, not {scheme}://"
            raise ConfigError(msg)
        try:
            if parameter.endswith("path"):  # a directory of CA certificates
                Path(path).stat()
            else:
                Path(path).read_bytes()
        except OSError as exc:
            msg = f"{name}: {parameter} {path}: {exc.strerror}"
            raise ConfigError(msg) from None
    _check_verification(name, url)


def _check_verification(name: str, url: URL) -> None:
    """ConfigError when a parameter of ``url`` would turn certificate checks off (any value but the safe one)."""
    for parameter, verifies in _VERIFY_ON.items():
        for given in url.query.getall(parameter, ()):
            if not verifies(given):
                safe = _SAFE_SPELLING[parameter]
                msg = (
                    f"{name}: {parameter}={given!r} would turn certificate verification off "
                    f"(only {parameter}={safe} is accepted); give the CA instead"
                )
                raise ConfigError(msg)


def _check_redis_parameters(url: URL) -> None:
    """ConfigError for a REDIS_URL query parameter redis-py would take that is not one of ours."""
    for parameter in url.query:
        if parameter not in REDIS_URL_PARAMETERS:
            msg = f"REDIS_URL: query parameter {parameter!r} is not accepted (only {', '.join(REDIS_URL_PARAMETERS)})"
            raise ConfigError(msg)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (an address on loopback, or localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_clerk_url(value: str) -> None:
    """Clerk's URL: https, or http on loopback only (the secret key would travel in clear), checks left on."""
    url = URL(value)
    if url.scheme == "http" and not is_loopback(url.host or ""):
        msg = (
            "CLERK_API_URL: http:// sends the secret key in clear; use https:// (http:// is for a local stand-in only)"
        )
        raise ConfigError(msg)
    _check_verification("CLERK_API_URL", url)
