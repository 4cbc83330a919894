"""What the worker says of the policy and the sealing key in force, at start and at each SIGHUP."""

from __future__ import annotations

from collections.abc import Collection

import structlog
from sign_in_tokens_client.contract.errors import ConfigError
from sign_in_tokens_client.sealing import encoded

from service.trust.policy import Policy
from service.trust.sealing import SealingKeys

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
            sealed_tables=policy.sealed_tables,
            require_sealed=file.require_sealed,
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


def log_sealing(sealing: SealingKeys, shared: bool) -> None:  # noqa: FBT001
    """At start: the public key replies are sealed with; a warning when Redis would keep answers in clear."""
    if sealing.public_key is not None:
        log.info("reply_sealing_key", public_key=encoded(sealing.public_key))
    elif shared:
        log.warning(
            "idempotency_answers_in_clear",
            reason="answers kept in Redis hold their tokens in clear without REPLY_SEALING_KEY_FILE "
            "(its key encrypts them); make one with: sign-in-tokens keys generate FILE",
        )


def reload_sealing_key(sealing: SealingKeys) -> bool:
    """Read REPLY_SEALING_KEY_FILE again (SIGHUP, before the policy); a bad file keeps the keys in force."""
    if sealing.path is None:
        return False
    try:
        sealing.reload()
    except ConfigError as exc:
        log.error("sealing_key_reload_failed", reason=str(exc), action="keeping the keys in force")  # noqa: TRY400
        return False
    log.info("sealing_key_reloaded", public_key=encoded(sealing.public_key or b""))
    return True
