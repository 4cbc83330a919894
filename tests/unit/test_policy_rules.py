"""The policy's decisions: which rule refuses what, the expiry filled in, where replies may go."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from sign_in_tokens_client.contract.errors import ForbiddenError
from sign_in_tokens_client.contract.lanes import Lane
from sign_in_tokens_client.contract.messages import CreateSignInTokenRequestBody

from service.trust.policy import Policy, load_policy
from tests.unit.test_policy_file import CONTRACT_EXAMPLE, write

Request = CreateSignInTokenRequestBody


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return Policy(load_policy(write(tmp_path, CONTRACT_EXAMPLE)))


def refusal(policy: Policy, caller: str | None, lane: Lane, request: Request) -> str:
    with pytest.raises(ForbiddenError) as raised:
        policy.admit(caller, lane, request)
    return raised.value.message


def test_a_request_without_an_expiry_gets_its_callers_maximum_not_clerks_30_days(policy: Policy) -> None:
    admitted = policy.admit("support-portal", Lane.INTERACTIVE, Request(user_id="user_1"))
    assert admitted.expires_in_seconds == 300
    assert policy.admit("billing", Lane.BULK, Request(user_id="user_1")).expires_in_seconds == 600
    within = Request(user_id="user_1", expires_in_seconds=120, org_id="org_1")
    assert policy.admit("support-portal", Lane.INTERACTIVE, within) == within


def test_each_refusal_names_its_rule_and_nothing_of_other_callers(policy: Policy) -> None:
    over = refusal(policy, "support-portal", Lane.INTERACTIVE, Request(user_id="u", expires_in_seconds=301))
    assert over == "max_expires_in_seconds: caller 'support-portal' may ask for at most 300 seconds, not 301"
    lane = refusal(policy, "support-portal", Lane.BULK, Request(user_id="u"))
    assert lane == "lanes: caller 'support-portal' may not use the bulk lane"
    org = refusal(policy, "billing", Lane.BULK, Request(user_id="u", org_id="org_1"))
    assert org == "allow_org_id: [defaults] may not set org_id"
    protected = refusal(policy, "support-portal", Lane.INTERACTIVE, Request(user_id="user_admin_7"))
    assert protected == "protected_users: no caller may get a sign-in token for user 'user_admin_7'"
    # Nothing of the rules that did not apply: not [defaults]' 600 to the portal, not the portal's 300 to others.
    assert "600" not in over + lane + protected
    assert "300" not in org


def test_without_defaults_unlisted_and_anonymous_callers_have_no_rules(tmp_path: Path) -> None:
    text = """
    [callers.support-portal]
    lanes = ["interactive"]
    max_expires_in_seconds = 300
    reply_to = ["support.replies.*"]
    """
    policy = Policy(load_policy(write(tmp_path, textwrap.dedent(text))))
    assert policy.file is not None
    assert policy.file.defaults is None
    # A caller with no rules gets nothing at all: no reply anywhere (the worker dead-letters it).
    assert not policy.knows("billing")
    assert not policy.knows(None)
    assert not policy.reply_allowed("billing", "anything.at.all")
    assert refusal(policy, "billing", Lane.INTERACTIVE, Request(user_id="u")) == (
        "callers: caller 'billing' has no rules in the policy"
    )
    assert policy.knows("support-portal")
    assert policy.admit("support-portal", Lane.INTERACTIVE, Request(user_id="u")).expires_in_seconds == 300


def test_defaults_serve_only_identified_callers_and_anonymous_only_nameless_ones(tmp_path: Path) -> None:
    text = CONTRACT_EXAMPLE + textwrap.dedent(
        """
        [anonymous]
        lanes = ["bulk"]
        max_expires_in_seconds = 60
        reply_to = ["amq.rabbitmq.reply-to"]
        """
    )
    policy = Policy(load_policy(write(tmp_path, text)))
    assert not policy.refuses_nameless
    assert policy.admit(None, Lane.BULK, Request(user_id="u")).expires_in_seconds == 60
    assert refusal(policy, None, Lane.INTERACTIVE, Request(user_id="u")) == (
        "lanes: [anonymous] may not use the interactive lane"
    )
    assert policy.admit("billing", Lane.INTERACTIVE, Request(user_id="u")).expires_in_seconds == 600
    # A listed caller leaving out user_id does not get its rules, nor [defaults]'.
    assert not policy.reply_allowed(None, "support.replies.eu")


def test_a_listed_caller_with_no_lanes_is_cut_off_while_defaults_exist(tmp_path: Path) -> None:
    text = CONTRACT_EXAMPLE.replace('lanes = ["interactive"]\n', "lanes = []\n")
    policy = Policy(load_policy(write(tmp_path, text)))
    assert policy.refuses_nameless  # [defaults] and no [anonymous]: the worker warns at start
    for lane in Lane:
        assert refusal(policy, "support-portal", lane, Request(user_id="u")) == (
            "lanes: caller 'support-portal' may use no lane"
        )
    with pytest.raises(ForbiddenError, match="may use no lane"):
        policy.may_revoke("support-portal")
    policy.may_revoke("billing")  # [defaults]' caller
    with pytest.raises(ForbiddenError, match="without a user_id property cannot revoke"):
        policy.may_revoke(None)
    Policy(None).may_revoke("anyone")  # no policy: any identified caller may revoke what it was given
    with pytest.raises(ForbiddenError):
        Policy(None).may_revoke(None)


def test_reply_to_takes_exact_names_globs_and_direct_reply_to(policy: Policy) -> None:
    assert policy.reply_allowed("support-portal", "support.replies.eu")
    assert not policy.reply_allowed("support-portal", "support.replies")  # the glob wants a suffix
    assert not policy.reply_allowed("support-portal", "billing.replies.eu")
    # [defaults] lists direct reply-to: the broker hands the worker its per-channel name.
    assert policy.reply_allowed("billing", "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxNjc0NjI0MQAAB2sAAAAAZ2Cx9Q==")
    assert policy.reply_allowed("billing", "amq.gen-JzTY20BRgKO-HjmUJj0wLg")
    assert not policy.reply_allowed("billing", "sign_in_tokens.results")
    # A listed caller does not inherit [defaults]' destinations.
    assert not policy.reply_allowed("support-portal", "amq.rabbitmq.reply-to.g1h2AA")
    # An entry for direct reply-to matches its names (a dot and the broker's suffix), nothing else.
    assert not policy.reply_allowed("billing", "amq.rabbitmq.reply-toX")
    assert not policy.reply_allowed("billing", "amq.rabbitmq.reply-to-evil")


def test_the_short_form_serves_only_the_listed_publishers_as_v1_did() -> None:
    policy = Policy.from_publishers(frozenset({"billing-service"}), 2_592_000)
    request = Request(user_id="user_1", org_id="org_1")
    assert policy.admit("billing-service", Lane.BULK, request) == request  # no expiry filled in
    assert policy.reply_allowed("billing-service", "any.queue")
    # Anyone else has no rules: dead-lettered (forbidden_caller), nameless requests too.
    assert not policy.knows("other")
    assert not policy.knows(None)
    everyone = Policy.from_publishers(frozenset(), 2_592_000)
    assert everyone.open
    assert everyone.admit(None, Lane.BULK, request) is request
