"""What the worker says of the policy in force, at start and at each SIGHUP: what an operator may not mean."""

from __future__ import annotations

from collections.abc import Collection

import structlog

from service.trust.policy import Policy

log = structlog.get_logger(__name__)


def log_policy(policy: Policy, policy_file: str | None, instances: Collection[str], event: str) -> None:
    """``event`` (``policy_in_force``, ``policy_reloaded``) with the policy's size, and a warning for each surprise."""
    file = policy.file
    if policy.open:
        log.warning(
            "no_policy",
            assumes="anyone who can publish to the request queues may ask for any user's token; set POLICY_FILE",
        )
    elif file is not None:
        log.info(
            event,
            policy_file=policy_file,
            callers=len(file.callers),
            defaults=file.defaults is not None,
            anonymous=file.anonymous is not None,
            protected_users=len(file.protected_users),
        )
    if policy.refuses_nameless:
        log.warning(
            "nameless_callers_refused",
            reason="the policy has [defaults] but no [anonymous]: requests without a user_id property are "
            "dead-lettered (forbidden_caller)",
        )
    wider = policy.wider_when_nameless()
    if wider:
        log.warning(
            "anonymous_wider_than_callers",
            callers=wider,
            reason="[anonymous] allows these listed callers more than their own rules: a request without "
            "user_id gets [anonymous]'s; narrow [anonymous], or take the callers' write permission away",
        )
    unknown = policy.unknown_default_instances(instances)
    if unknown:
        log.warning(
            "default_instance_unknown",
            tables=unknown,
            reason="their default_instance is no Clerk instance this worker has: their requests without "
            "x-clerk-instance are refused (invalid_request)",
        )
