"""deploy/rabbitmq/definitions.json: the broker's side of a deployment, generated from the code.

    uv run python -m service.amqp.definitions > deploy/rabbitmq/definitions.json

A vhost, the queues with the arguments the worker declares them with (the same function makes
both, so they cannot differ), the audit exchange, and one user per role with the permissions
docs/security.md gives (a test checks the page's table against ``ROLES``). Users come without a
password (``password_hash`` empty: they cannot log in until one is set with ``rabbitmqctl
change_password``, or they use client certificates): no secret is in the file. Load it with
``load_definitions`` in rabbitmq.conf, or ``rabbitmqctl import_definitions``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from service.amqp.topology import audit_archive_arguments, declared_queues
from service.config import Settings

VHOST: Final = "sign-in-tokens"
RABBITMQ_VERSION: Final = "3.10.8"
# Each role's user, and its configure, write and read patterns (docs/security.md, "Broker permissions").
ROLES: Final[dict[str, tuple[str, str, str]]] = {
    "sign-in-tokens": (r"^sign_in_tokens\.", r"^(amq\.default|sign_in_tokens\.)", r"^sign_in_tokens\."),
    "support-portal": (r"^support\.replies\.", r"^(amq\.default|support\.replies\.)", r"^support\.replies\."),
    "orders-service": (r"^$", r"^amq\.default$", r"^$"),
    # The bulk tool's reply queues carry its user: each caller may be granted its own prefix only.
    "onboarding-job": (
        r"^sign-in-tokens-bulk\.onboarding-job\.",
        r"^(amq\.default|sign-in-tokens-bulk\.onboarding-job\.)",
        r"^sign-in-tokens-bulk\.onboarding-job\.",
    ),
    # The workers declare the archive and bind it; the archiver only reads it.
    "audit-archiver": (r"^$", r"^$", r"^sign_in_tokens\.audit\.archive$"),
}


def document(settings: Settings | None = None) -> dict[str, Any]:
    """The definitions, for the default settings unless others are given."""
    settings = settings or Settings()
    return {
        "rabbit_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "vhosts": [{"name": VHOST}],
        "users": [
            {"name": user, "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}
            for user in ROLES
        ],
        "permissions": [
            {"user": user, "vhost": VHOST, "configure": configure, "write": write, "read": read}
            for user, (configure, write, read) in ROLES.items()
        ],
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": _policies(settings),
        "queues": [
            {"name": name, "vhost": VHOST, "durable": True, "auto_delete": False, "arguments": arguments}
            for name, arguments in _queues(settings).items()
        ],
        "exchanges": [
            {
                "name": settings.audit_exchange,
                "vhost": VHOST,
                "type": "topic",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
        ],
        "bindings": [
            {
                "source": settings.audit_exchange,
                "vhost": VHOST,
                "destination": settings.audit_archive,
                "destination_type": "queue",
                "routing_key": "#",
                "arguments": {},
            }
        ]
        if settings.audit_archive
        else [],
    }


# Anyone with write on amq.default can publish into the archive by its name (the default exchange
# routes to every queue): a bound in bytes keeps a flood from filling the broker's disk (the oldest
# segments go first; the archiver has shipped them by then). Applied as a policy, it can change
# without declaring the stream again.
AUDIT_ARCHIVE_MAX_BYTES: Final = 10_000_000_000


def _policies(settings: Settings) -> list[dict[str, Any]]:
    if settings.audit_archive is None:
        return []
    return [
        {
            "vhost": VHOST,
            "name": "sign-in-tokens-audit-archive",
            "pattern": f"^{re.escape(settings.audit_archive)}$",
            "apply-to": "queues",
            "definition": {"max-length-bytes": AUDIT_ARCHIVE_MAX_BYTES},
            "priority": 0,
        }
    ]


def _queues(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every queue the worker declares, the audit archive included."""
    queues = declared_queues(settings)
    if settings.audit_archive is not None:
        queues[settings.audit_archive] = audit_archive_arguments(settings)
    return queues


def render() -> str:
    """The definitions as JSON."""
    return json.dumps(document(), indent=2) + "\n"


if __name__ == "__main__":
    print(render(), end="")  # noqa: T201 - the module's output
