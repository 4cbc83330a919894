"""Acknowledgement runs: which tags one ``multiple`` may cover."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.amqp.acks import _Run


def test_tags_finished_in_order_are_one_multiple_ack() -> None:
    assert _Run().settle({1, 2, 3}) == (3, [])


def test_a_delivery_still_in_work_holds_back_no_ack_and_is_never_covered() -> None:
    run = _Run()
    assert run.settle({1}) == (1, [])
    # 2 is still being worked on: 3 and 4 go one by one.
    assert run.settle({3, 4}) == (None, [3, 4])
    # 2 finishes: it alone is acked, by a multiple that stops at 2 (3 and 4 were acked already).
    assert run.settle({2}) == (2, [])
    assert run.settle({5, 6}) == (6, [])


def test_a_returned_delivery_counts_as_settled() -> None:
    run = _Run()
    run.settle({1})  # returned with nack: nothing to ack
    assert run.settle({2, 3}) == (3, [])


@given(
    st.integers(min_value=1, max_value=60).flatmap(
        lambda n: st.tuples(
            st.permutations(list(range(1, n + 1))),
            st.lists(st.integers(min_value=1, max_value=5), min_size=n, max_size=n),
            st.sets(st.integers(min_value=1, max_value=n)),
        )
    )
)
def test_a_multiple_ack_covers_only_tags_settled_here_and_acks_nothing_twice(
    case: tuple[list[int], list[int], set[int]],
) -> None:
    """Any order, any batching, some deliveries never finished: no unsettled tag is ever acked."""
    order, sizes, never = case
    run = _Run()
    settled: set[int] = set()
    acked: set[int] = set()
    finished = [tag for tag in order if tag not in never]
    i = 0
    for size in sizes:
        batch = set(finished[i : i + size])
        i += size
        if not batch:
            break
        multiple, alone = run.settle(batch)
        settled |= batch
        covered = set(range(1, multiple + 1)) - acked if multiple is not None else set()
        assert covered <= settled, "a multiple ack covered a delivery not settled here"
        assert multiple is None or multiple in batch, "the multiple's own tag must be one not acked yet"
        assert not (set(alone) & acked), "a tag acked twice"
        acked |= covered | set(alone)
        assert batch <= acked
    assert not (acked & never)
