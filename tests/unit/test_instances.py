"""CLERK_INSTANCES_FILE: the instances one service fronts, read strictly; without it, one named ``default``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from sign_in_tokens_client.connection import DEFAULT_INSTANCE
from sign_in_tokens_client.contract.errors import ConfigError, ForbiddenError, InvalidRequestError

from service.clerk.instances import load_instances
from service.config import Secret, load_settings
from service.trust.policy import Policy, load_policy

LIVE = "sk_live_" + "p" * 24
TEST = "sk_test_" + "s" * 24


def instances_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "instances.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def test_without_the_file_the_one_key_is_the_default_instance() -> None:
    settings = load_settings({"CLERK_SECRET_KEY": LIVE, "CLERK_RATE_WINDOW_SECONDS": "5"})
    (instance,) = load_instances(settings, None).values()
    assert (instance.name, instance.state_id, instance.api_url) == (
        DEFAULT_INSTANCE,
        DEFAULT_INSTANCE,
        settings.clerk_api_url,
    )
    assert (instance.secret_key.reveal(), instance.rate_limit, instance.rate_window_seconds) == (LIVE, 1000, 5.0)


def test_each_instance_has_its_key_url_and_limit(tmp_path: Path) -> None:
    key_file = tmp_path / "staging-key"
    key_file.write_text(TEST + "\n")
    path = instances_file(
        tmp_path,
        f"""
        [instances.prod]
        secret_key = "{LIVE}"
        rate_window_seconds = 10

        [instances.staging]
        secret_key_file = "{key_file}"
        api_url = "http://127.0.0.1:9999/v1"
        rate_limit = 40
        state_id = "staging-1"
        """,
    )
    found = load_instances(load_settings({}), path)
    prod, staging = found["prod"], found["staging"]
    assert (prod.secret_key.reveal(), prod.rate_limit, prod.api_url, prod.state_id) == (
        LIVE,
        1000,  # from the key's kind
        "https://api.clerk.com/v1",
        "prod",
    )
    assert (staging.secret_key.reveal(), staging.rate_limit, staging.api_url, staging.state_id) == (
        TEST,
        40,
        "http://127.0.0.1:9999/v1",
        "staging-1",
    )
    assert LIVE not in prod.shown()
    assert prod.shown().startswith("prod: key sk_live_")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[instances.prod]\nsecret_keyfile = "x"\n',
            "at instances.prod: Object contains unknown field `secret_keyfile`",
        ),
        ('[instances.prod]\napi_url = "https://x"\n', "at instances.prod: set secret_key or secret_key_file"),
        (f'[instances.prod]\nsecret_key = "{LIVE}"\nsecret_key_file = "/k"\n', "at instances.prod: set secret_key or"),
        (
            '[instances.prod]\nsecret_key_file = "/no/such/key"\n',
            "at instances.prod.secret_key_file: cannot read /no/such/key",
        ),
        ('[instances.prod]\nsecret_key = "sk live"\n', "at instances.prod: must be a non-empty key without spaces"),
        (f'[instances.Prod]\nsecret_key = "{LIVE}"\n', "at instances.Prod: Expected `str` matching regex"),
        (
            f'[instances.prod]\nsecret_key = "{LIVE}"\nrate_limit = 0\n',
            "at instances.prod.rate_limit: Expected `int` >= 1",
        ),
        (
            f'[instances.prod]\nsecret_key = "{LIVE}"\napi_url = "http://clerk.example/v1"\n',
            "at instances.prod.api_url: http:// sends the secret key in clear",
        ),
        (
            f'[instances.a]\nsecret_key = "{LIVE}"\nstate_id = "b"\n[instances.b]\nsecret_key = "{TEST}"\n',
            "at instances.a.state_id: 'b' is another instance's state too",
        ),
        (f'[instance.prod]\nsecret_key = "{LIVE}"\n', "Object contains unknown field `instance`"),
        ("[instances]\n", "at instances: name 1 to 32 instances"),
        ("instances = 3\n", "at instances: Expected `object`, got `int`"),
        ("[instances.prod\n", "is not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_place(tmp_path: Path, text: str, expected: str) -> None:
    path = instances_file(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_instances(load_settings({}), path)
    message = str(raised.value)
    assert message.startswith(f"CLERK_INSTANCES_FILE: {path}")
    assert expected in message, message
    assert "\n" not in message
    assert LIVE not in message


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CLERK_INSTANCES_FILE: cannot read"):
        load_instances(load_settings({}), str(tmp_path / "none.toml"))


ROUTING_POLICY = """
[defaults]
lanes = ["interactive"]
max_expires_in_seconds = 60
reply_to = ["*"]

[callers.staging-tools]
lanes = ["interactive"]
max_expires_in_seconds = 60
reply_to = ["*"]
instances = ["staging", "staging-*"]
default_instance = "staging"

[callers.everywhere]
lanes = ["interactive"]
max_expires_in_seconds = 60
reply_to = ["*"]
instances = ["*"]
"""
KNOWN = frozenset({"default", "staging", "prod"})


def routed(policy: Policy, caller: str | None, named: str | None) -> str:
    try:
        return policy.instance_for(caller, named, KNOWN)
    except (ForbiddenError, InvalidRequestError) as exc:
        return f"{exc.code}: {exc.message}"


def test_a_request_goes_to_its_header_else_its_callers_default_else_default(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(ROUTING_POLICY)
    policy = Policy(load_policy(str(path)))
    assert routed(policy, "staging-tools", None) == "staging"
    assert routed(policy, "billing", None) == "default"
    assert routed(policy, "everywhere", "prod") == "prod"
    # A name the caller may not use is forbidden, whether or not it exists: callers cannot list the instances.
    assert (
        routed(policy, "staging-tools", "prod")
        == "forbidden: instances: caller 'staging-tools' may not use instance 'prod'"
    )
    # Allowed by a glob but not configured: invalid_request.
    assert routed(policy, "staging-tools", "staging-eu") == (
        "invalid_request: x-clerk-instance: there is no Clerk instance 'staging-eu'"
    )
    assert routed(policy, "billing", "nope") == "forbidden: instances: [defaults] may not use instance 'nope'"
    assert (
        routed(policy, "everywhere", "nope") == "invalid_request: x-clerk-instance: there is no Clerk instance 'nope'"
    )
    # Without a policy, anyone may name any instance there is; an unknown one is invalid_request.
    assert routed(Policy(None), None, "prod") == "prod"
    assert routed(Policy(None), None, "nope") == "invalid_request: x-clerk-instance: there is no Clerk instance 'nope'"
    assert routed(Policy(None), None, None) == "default"
    # ALLOWED_PUBLISHERS' callers may ask for anything: any instance there is.
    assert routed(Policy.from_publishers(frozenset({"guest"}), 60), "guest", "staging") == "staging"
    only = Policy(None)
    assert only.instance_for(None, None, frozenset({"default"})) == "default"
    with pytest.raises(InvalidRequestError, match="name one with the header x-clerk-instance"):
        only.instance_for(None, None, frozenset({"prod"}))


def test_a_default_instance_the_caller_may_not_use_is_a_bad_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(ROUTING_POLICY.replace('default_instance = "staging"', 'default_instance = "prod"'))
    with pytest.raises(ConfigError) as raised:
        load_policy(str(path))
    assert "at callers.staging-tools.default_instance: 'prod' is not one of its instances" in str(raised.value)


def test_an_empty_list_of_instances_allows_none(tmp_path: Path) -> None:
    """``instances = []`` is not an absent key: the caller may use no instance, not even its fallback."""
    path = tmp_path / "policy.toml"
    path.write_text(ROUTING_POLICY.replace('instances = ["*"]', "instances = []"))
    policy = Policy(load_policy(str(path)))
    assert (
        routed(policy, "everywhere", None) == "forbidden: instances: caller 'everywhere' may not use instance 'default'"
    )


def test_a_default_instance_is_an_instances_name_and_an_unknown_one_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(ROUTING_POLICY.replace('default_instance = "staging"', 'default_instance = "*"'))
    with pytest.raises(ConfigError) as raised:
        load_policy(str(path))
    assert "at callers.staging-tools.default_instance: Expected `str` matching regex" in str(raised.value)
    path.write_text(ROUTING_POLICY)
    policy = Policy(load_policy(str(path)))
    assert policy.unknown_default_instances(frozenset({"default"})) == ["caller 'staging-tools'"]
    assert policy.unknown_default_instances(KNOWN) == []


def test_a_nameless_request_that_may_use_more_instances_than_a_caller_is_warned_of(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        ROUTING_POLICY
        + '\n[anonymous]\nlanes = ["interactive"]\nmax_expires_in_seconds = 60\nreply_to = ["*"]\ninstances = ["prod"]\n'
    )
    assert "billing" not in Policy(load_policy(str(path))).wider_when_nameless()
    assert "staging-tools" in Policy(load_policy(str(path))).wider_when_nameless()


def test_a_key_written_where_a_path_or_a_name_goes_is_never_shown(tmp_path: Path) -> None:
    for text in (
        f'[instances.prod]\nsecret_key_file = "{LIVE}"\n',
        f'[instances.{LIVE}]\nsecret_key = "{LIVE}"\n',
    ):
        path = instances_file(tmp_path, text)
        with pytest.raises(ConfigError) as raised:
            load_instances(load_settings({}), path)
        assert LIVE not in str(raised.value)
        assert "key" in str(raised.value)


def test_a_key_file_is_read_as_a_key_or_refused_in_one_line(tmp_path: Path) -> None:
    """A byte-order mark is no part of the key; bytes that are not UTF-8, control characters, a NUL: one line."""
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xef\xbb\xbf" + LIVE.encode() + b"\n")
    text = f'[instances.prod]\nsecret_key_file = "{key_file}"\n'
    (prod,) = load_instances(load_settings({}), instances_file(tmp_path, text)).values()
    assert (prod.secret_key.reveal(), prod.rate_limit) == (LIVE, 1000)
    for content, expected in ((LIVE.encode() + b"\xff", "is not UTF-8 text"), (b"sk_live_a\x01b", "printable ASCII")):
        key_file.write_bytes(content)
        with pytest.raises(ConfigError) as raised:
            load_instances(load_settings({}), instances_file(tmp_path, text))
        assert expected in str(raised.value)
        assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="not a path a file can have"):
        load_instances(
            load_settings({}), instances_file(tmp_path, '[instances.prod]\nsecret_key_file = "/x\\u0000y"\n')
        )


def test_an_error_is_one_line_whatever_the_file_holds(tmp_path: Path) -> None:
    path = instances_file(tmp_path, f'[instances."pro\\nd"]\nsecret_key = "{LIVE}"\n')
    with pytest.raises(ConfigError) as raised:
        load_instances(load_settings({}), path)
    assert "\n" not in str(raised.value)
    assert "pro\\nd" in str(raised.value)


def test_the_key_file_is_read_again_each_time_and_an_unchanged_key_is_the_same_instance(tmp_path: Path) -> None:
    """CLERK_SECRET_KEY_FILE (one key): a reload sees a rotated key; the same key read twice is one instance."""
    key_file = tmp_path / "key"
    key_file.write_text(LIVE)
    settings = load_settings({"CLERK_SECRET_KEY_FILE": str(key_file)})
    first = load_instances(settings, None)[DEFAULT_INSTANCE]
    assert load_instances(settings, None)[DEFAULT_INSTANCE] == first
    key_file.write_text(TEST + "\n")
    rotated = load_instances(settings, None)[DEFAULT_INSTANCE]
    assert rotated != first
    assert rotated.secret_key.reveal() == TEST
    assert rotated.state_id == first.state_id == DEFAULT_INSTANCE
    key_file.write_text("")
    with pytest.raises(ConfigError, match=r"^CLERK_SECRET_KEY_FILE: must be a non-empty key"):
        load_instances(settings, None)


def test_the_key_itself_wins_over_a_key_file_and_is_never_read_again(tmp_path: Path) -> None:
    settings = load_settings({"CLERK_SECRET_KEY": LIVE, "CLERK_SECRET_KEY_FILE": str(tmp_path / "absent")})
    assert settings.clerk_secret_key_file is None
    assert load_instances(settings, None)[DEFAULT_INSTANCE].secret_key.reveal() == LIVE


def test_a_key_is_equal_only_to_the_same_key_and_never_hashed() -> None:
    assert Secret(LIVE) == Secret(LIVE)
    assert Secret(LIVE) != Secret(TEST)
    assert Secret(LIVE) != LIVE
    with pytest.raises(TypeError):
        hash(Secret(LIVE))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[instances."prod\\n"]\nsecret_key = "' + TEST + '"\n', "instances"),
        ('[instances.prod]\nsecret_key = "' + TEST + '"\nstate_id = "prod\\n"\n', "instances.prod.state_id"),
        ('[instances.a]\nsecret_key = "' + TEST + '"\n[instances.b]\nsecret_key = "' + TEST + '"\n', "instances.a"),
    ],
    ids=["a name ending in a newline", "a state id ending in a newline", "one key for two instances"],
)
def test_names_end_where_they_seem_to_and_a_key_is_one_instances(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "instances.toml"
    path.write_text(text)
    settings = load_settings({"CLERK_SECRET_KEY": LIVE})
    with pytest.raises(ConfigError, match=rf"^CLERK_INSTANCES_FILE: {path} at {where}"):
        load_instances(settings, str(path))


@pytest.mark.parametrize("prefix", ["sign_in_tokens", "sign_in_tokens.create"])
def test_a_hold_queue_prefix_that_would_name_another_queue_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"^HOLD_QUEUE_PREFIX: "):
        load_settings({"CLERK_SECRET_KEY": LIVE, "HOLD_QUEUE_PREFIX": prefix})
