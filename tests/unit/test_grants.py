"""The in-process record of who received which token: its answers, its bound, its size."""

from __future__ import annotations

import tracemalloc

from service.state.grants import Grants


async def test_only_the_recorded_caller_is_its_holder_until_the_record_goes() -> None:
    grants = Grants(None, max_entries=3)
    await grants.record("sign_in_token", "sit_1", "portal", 300)
    await grants.record("sign_in_token", "sit_2", None, 300)
    assert await grants.received_by("sign_in_token", "sit_1", "portal")
    assert not await grants.received_by("sign_in_token", "sit_1", "billing")
    assert not await grants.received_by("sign_in_token", "sit_1", None)
    assert await grants.received_by("sign_in_token", "sit_2", None)
    assert not await grants.received_by("sign_in_token", "sit_never", "portal")
    for n in range(3, 6):
        await grants.record("sign_in_token", f"sit_{n}", "portal", 300)
    assert not await grants.received_by("sign_in_token", "sit_1", "portal")  # the oldest went first
    assert await grants.received_by("sign_in_token", "sit_5", "portal")


async def test_an_id_given_as_the_other_kind_names_no_grant() -> None:
    """An actor token's grant answers only as an actor token's, a sign-in token's only as a sign-in token's."""
    grants = Grants(None)
    await grants.record("actor_token", "act_1", "portal", 300)
    await grants.record("sign_in_token", "sit_1", "portal", 300)
    assert await grants.received_by("actor_token", "act_1", "portal")
    assert not await grants.received_by("sign_in_token", "act_1", "portal")
    assert not await grants.received_by("actor_token", "sit_1", "portal")


async def test_an_expired_record_no_longer_answers() -> None:
    grants = Grants(None)
    await grants.record("sign_in_token", "sit_1", "portal", 1)
    assert await grants.received_by("sign_in_token", "sit_1", "portal")
    # The expiry is whole monotonic seconds: a lifetime already over reads as gone.
    await grants.record("sign_in_token", "sit_2", "portal", -10)
    assert not await grants.received_by("sign_in_token", "sit_2", "portal")


async def test_an_entry_costs_two_integers_not_its_strings() -> None:
    grants = Grants(None, "key", max_entries=50_000)
    tracemalloc.start()
    try:
        for n in range(50_000):
            await grants.record("sign_in_token", f"sit_{n:024x}", "support-portal", 300)
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size / 50_000 < 200  # bytes an entry: 50,000 entries (the bound) under 10 MB


async def test_a_grant_is_its_clerk_instances() -> None:
    """The same id at another instance names no grant: a revocation goes to the instance the token came from."""
    grants = Grants(None)
    await grants.record("actor_token", "act_1", "portal", 300, state="staging")
    assert await grants.received_by("actor_token", "act_1", "portal", state="staging")
    assert not await grants.received_by("actor_token", "act_1", "portal")
    assert not await grants.received_by("actor_token", "act_1", "portal", state="prod")
