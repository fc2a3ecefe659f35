"""Prepared messages: slow work outside the transaction, quick work committed together.

``BusNode.drain(prepare=...)`` prepares messages in order until ``PREPARE_BUDGET_S`` is
spent, then commits them in one transaction with the cursor. These tests count
transactions by the messages one ``drain(max_batches=1)`` applies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from tests.bus._common import ALPHA, CONSUMER, TOPOLOGY
from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal, Transaction
from trinity.bus.message import Message, encode_payload
from trinity.bus.node import PREPARE_BUDGET_S, BusNode
from trinity.errors import InvalidPayload, RetryableError
from trinity.settings import Settings

Commit = Callable[[Transaction], None]


@pytest.fixture
def node(bus_settings: Settings, journal: Journal,
         zmq_ctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[BusNode]:
    journal.conn.execute("CREATE TABLE state (i INTEGER)")
    with journal.transaction() as tx:
        for i in range(10):
            tx.publish(ALPHA, encode_payload({"i": i}))
    node = BusNode(CONSUMER, BusConfig.of(bus_settings), journal, TOPOLOGY, context=zmq_ctx)
    yield node
    node.close()


def _index(msg: Message) -> int:
    return int(json.loads(msg.payload)["i"])


def _recorder(i: int) -> Commit:
    def commit(tx: Transaction) -> None:
        tx.conn.execute("INSERT INTO state VALUES (?)", (i,))
    return commit


def _state(journal: Journal) -> list[int]:
    return [r[0] for r in journal.conn.execute("SELECT i FROM state ORDER BY rowid")]


def _no_handler(msg: Message, tx: Transaction) -> None:
    raise AssertionError("with prepare, the commit it returns is what runs")


def test_quick_preparations_are_committed_in_one_transaction(
        node: BusNode, journal: Journal) -> None:
    prepared: list[int] = []

    def prepare(msg: Message) -> Commit:
        prepared.append(_index(msg))
        return _recorder(_index(msg))

    assert node.drain(_no_handler, prepare=prepare, max_batches=1) == 10
    assert prepared == list(range(10))
    assert _state(journal) == list(range(10))
    assert journal.cursor(CONSUMER, ALPHA) == 10


def test_a_slow_preparation_is_committed_as_soon_as_it_is_done(
        node: BusNode, journal: Journal) -> None:
    """Past the budget nothing more is prepared: a model call is not held back by the next."""
    def prepare(msg: Message) -> Commit:
        time.sleep(PREPARE_BUDGET_S * 1.5)
        return _recorder(_index(msg))

    assert node.drain(_no_handler, prepare=prepare, max_batches=1) == 1
    assert journal.cursor(CONSUMER, ALPHA) == 1
    # The stream knows more is waiting and goes on at the next drain.
    assert node.drain(_no_handler, prepare=prepare, max_batches=3) == 3
    assert _state(journal) == [0, 1, 2, 3]


def test_a_retryable_failure_commits_what_came_before_and_retries_the_rest(
        node: BusNode, journal: Journal) -> None:
    failures = {4: 1}  # message 4 fails once

    def prepare(msg: Message) -> Commit:
        i = _index(msg)
        if failures.get(i):
            failures[i] -= 1
            raise RetryableError("the store is busy")
        return _recorder(i)

    assert node.drain(_no_handler, prepare=prepare, max_batches=4) == 4
    assert journal.cursor(CONSUMER, ALPHA) == 4
    assert node.counters.retries == 1
    # Not before the back-off: the failed message waits.
    assert node.drain(_no_handler, prepare=prepare, max_batches=4) == 0
    time.sleep(0.1)
    assert node.drain(_no_handler, prepare=prepare, max_batches=4) == 6
    assert _state(journal) == list(range(10))
    assert journal.dead_letters(CONSUMER) == []


def test_a_retryable_failure_of_the_first_message_commits_nothing(
        node: BusNode, journal: Journal) -> None:
    def prepare(msg: Message) -> Commit:
        raise RetryableError("the store is busy")

    assert node.drain(_no_handler, prepare=prepare, max_batches=4) == 0
    assert journal.cursor(CONSUMER, ALPHA) == 0
    assert node.counters.retries == 1  # one back-off, not one per message


@pytest.mark.parametrize("isolate_each", [True, False])
def test_a_bad_message_is_dead_lettered_and_the_others_committed(
        bus_settings: Settings, journal: Journal, zmq_ctx: zmq.Context[zmq.Socket[bytes]],
        isolate_each: bool) -> None:
    journal.conn.execute("CREATE TABLE state (i INTEGER)")
    with journal.transaction() as tx:
        for i in range(6):
            tx.publish(ALPHA, encode_payload({"i": i}))
    node = BusNode(CONSUMER, BusConfig.of(bus_settings), journal, TOPOLOGY, context=zmq_ctx,
                   isolate_each=isolate_each)
    prepared: list[int] = []

    def prepare(msg: Message) -> Commit:
        i = _index(msg)
        prepared.append(i)
        if i == 2:
            raise InvalidPayload("two is not allowed")
        return _recorder(i)

    try:
        assert node.drain(_no_handler, prepare=prepare, max_batches=1) == 6
    finally:
        node.close()
    assert prepared == list(range(6))  # prepared once each, even when the batch re-runs
    assert _state(journal) == [0, 1, 3, 4, 5]
    assert [d.reason for d in journal.dead_letters(CONSUMER)] == ["two is not allowed"]
    assert node.counters.applied == 5 and node.counters.dead_lettered == 1


def test_prepare_many_gets_the_messages_in_chunks_and_commits_them_together(
        node: BusNode, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    """One call prepares several messages (one classification batch for all of them)."""
    monkeypatch.setattr("trinity.bus.node.PREPARE_CHUNK", 4)
    calls: list[list[int]] = []

    def prepare_many(msgs: list[Message]) -> list[Commit | Exception]:
        calls.append([_index(m) for m in msgs])
        return [_recorder(_index(m)) for m in msgs]

    assert node.drain(_no_handler, prepare_many=prepare_many, max_batches=1) == 10
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _state(journal) == list(range(10))
    assert journal.cursor(CONSUMER, ALPHA) == 10


def test_prepare_many_dead_letters_the_messages_it_answers_with_an_exception(
        node: BusNode, journal: Journal) -> None:
    def prepare_many(msgs: list[Message]) -> list[Commit | Exception]:
        return [InvalidPayload(f"{_index(m)} is odd") if _index(m) % 2 else _recorder(_index(m))
                for m in msgs]

    assert node.drain(_no_handler, prepare_many=prepare_many, max_batches=1) == 10
    assert _state(journal) == [0, 2, 4, 6, 8]
    assert sorted(d.reason for d in journal.dead_letters(CONSUMER)) == sorted(
        f"{i} is odd" for i in (1, 3, 5, 7, 9))


def test_prepare_many_raising_retries_the_whole_chunk(
        node: BusNode, journal: Journal) -> None:
    failures = [1]

    def prepare_many(msgs: list[Message]) -> list[Commit | Exception]:
        if failures[0]:
            failures[0] -= 1
            raise RetryableError("the store is busy")
        return [_recorder(_index(m)) for m in msgs]

    assert node.drain(_no_handler, prepare_many=prepare_many, max_batches=4) == 0
    assert node.counters.retries == 1
    time.sleep(0.1)
    assert node.drain(_no_handler, prepare_many=prepare_many, max_batches=4) == 10
    assert _state(journal) == list(range(10))
    assert journal.dead_letters(CONSUMER) == []


def test_prepare_many_may_answer_for_the_first_messages_only(
        node: BusNode, journal: Journal) -> None:
    """Its time was up after two: those are committed, the rest prepared at the next drain."""
    def prepare_many(msgs: list[Message]) -> list[Commit | Exception]:
        return [_recorder(_index(m)) for m in msgs[:2]]

    assert node.drain(_no_handler, prepare_many=prepare_many, max_batches=1) == 2
    assert journal.cursor(CONSUMER, ALPHA) == 2
    assert node.drain(_no_handler, prepare_many=prepare_many, max_batches=4) == 8
    assert _state(journal) == list(range(10))
