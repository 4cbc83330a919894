"""The policy file (POLICY_FILE): decoded into typed rules, a bad file named at its fault."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from sign_in_tokens_client.contract.errors import ConfigError

from service.trust.policy import load_policy

CONTRACT_EXAMPLE = """
protected_users = ["user_admin_*"]   # glob patterns: never a token for these, for anyone

[defaults]                           # callers not listed below; leave it out to refuse them
lanes = ["interactive", "bulk"]
max_expires_in_seconds = 600
allow_org_id = false
reply_to = ["amq.rabbitmq.reply-to", "amq.gen-*"]   # exact names, or globs

[callers.support-portal]             # a caller is the message's validated `user_id` property
lanes = ["interactive"]
max_expires_in_seconds = 300
allow_org_id = true
reply_to = ["support.replies.*"]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_the_contracts_example_loads_and_names_each_callers_rules(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, CONTRACT_EXAMPLE))
    assert policy.protected_users == ("user_admin_*",)
    portal = policy.rules_for("support-portal")
    assert portal is not None
    assert (portal.lanes, portal.max_expires_in_seconds, portal.allow_org_id) == (frozenset({"interactive"}), 300, True)
    assert portal.reply_to == ("support.replies.*",)
    # An identified caller not listed gets [defaults]; a request without a user_id property gets
    # [anonymous], which this file does not have (contract v3: [defaults] never serves the nameless).
    assert policy.rules_for("billing") == policy.defaults
    assert policy.rules_for(None) is None
    assert policy.defaults is not None
    assert policy.defaults.lanes == frozenset({"interactive", "bulk"})


def test_without_defaults_a_caller_not_listed_is_refused(tmp_path: Path) -> None:
    without_defaults = """
    [callers.support-portal]
    lanes = ["interactive"]
    max_expires_in_seconds = 300
    reply_to = ["support.replies.*"]
    """
    policy = load_policy(write(tmp_path, textwrap.dedent(without_defaults)))
    assert policy.defaults is None
    assert policy.rules_for("billing") is None
    assert policy.rules_for(None) is None
    rules = policy.rules_for("support-portal")
    assert rules is not None
    assert rules.allow_org_id is False, "what the file does not allow is not allowed"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # A typo is an error, not a silently absent rule.
        (
            ("allow_org_id = true", "allow_orgid = true"),
            "at callers.support-portal: Object contains unknown field `allow_orgid`",
        ),
        (
            ("max_expires_in_seconds = 300", 'max_expires_in_seconds = "300"'),
            "at callers.support-portal.max_expires_in_seconds: Expected `int`, got `str`",
        ),
        (
            ("max_expires_in_seconds = 300", "max_expires_in_seconds = 0"),
            "at callers.support-portal.max_expires_in_seconds: Expected `int` >= 1",
        ),
        (
            ('lanes = ["interactive"]', 'lanes = ["urgent"]'),
            "at callers.support-portal.lanes[0]: Invalid enum value 'urgent'",
        ),
        (
            ('reply_to = ["support.replies.*"]', 'reply_to = [""]'),
            "at callers.support-portal.reply_to[0]: Expected `str` of length >= 1",
        ),
        (
            ('reply_to = ["support.replies.*"]', ""),
            "at callers.support-portal: Object missing required field `reply_to`",
        ),
        (("[defaults]", "[default]"), "Object contains unknown field `default`"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_place(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    path = write(tmp_path, CONTRACT_EXAMPLE.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"POLICY_FILE: {path}")
    assert expected in message, message
    assert "\n" not in message


def test_a_file_that_is_not_toml_names_the_line(tmp_path: Path) -> None:
    text = CONTRACT_EXAMPLE.replace("allow_org_id = true", "allow_org_id = ")
    line = text.splitlines().index("allow_org_id = ") + 1
    with pytest.raises(ConfigError, match=rf"is not valid TOML: .*line {line}\b"):
        load_policy(write(tmp_path, text))


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"POLICY_FILE: cannot read .*No such file"):
        load_policy(str(tmp_path / "absent.toml"))
