"""A process's place on the bus: one PUB socket out, one SUB socket in.

Publishing commits to the journal first and sends after the commit, so a message
on the wire is always already durable. Consuming never trusts the wire: a live
message only says "stream S has something at seq N"; the node then applies what
the journal holds after its durable cursor, in order, inside one transaction per
batch that also advances the cursor and journals the handler's outputs. That one
mechanism gives dedupe (seq <= cursor is skipped), gap repair and slow-joiner /
high-water-mark repair (the journal has what the socket dropped), and replay
after a restart (the cursor is durable).
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from trinity.bus import curve
from trinity.bus.config import BusConfig
from trinity.bus.journal import Journal, Transaction
from trinity.bus.message import Message, decode, encode_payload
from trinity.clock import now_ms
from trinity.contract import Topology
from trinity.endpoints import require_keys_off_loopback
from trinity.errors import (
    InvalidPayload,
    JournalError,
    MalformedMessage,
    RetryableError,
)

log = logging.getLogger(__name__)

Handler = Callable[[Message, Transaction], None]
# Slow work done before the transaction (a model call): returns what to commit.
Prepare = Callable[[Message], Callable[[Transaction], None]]
# The same for several messages at once (one classification batch): per message, what to
# commit or the exception that dead-letters it; raising retries them all later. It may
# answer for the first messages only (its time was up): the rest wait for the next call.
PrepareMany = Callable[[list[Message]], list[Callable[[Transaction], None] | Exception]]

_RETRY_BACKOFF_S = (0.05, 0.2, 1.0, 5.0)
# Live messages are only hints (the journal is applied); past this many unapplied
# hints a stream just stays awake until the journal is drained.
_MAX_LIVE_HINTS = 10_000
_LIVE_READS_WHILE_BEHIND = 64
# Prepared messages share one transaction until their preparing has taken this long:
# quick ones (a classification, a cached answer) are committed many at a time, a
# model call that takes seconds is committed alone, as soon as it is done.
PREPARE_BUDGET_S = 0.02
# ``prepare_many`` is given at most this many messages at a time (the budget is checked
# between calls): enough for a batch to pay off, few enough to commit within ~50 ms.
PREPARE_CHUNK = 64
_SEND_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_SEND_LAST = int(zmq.NOBLOCK)


def _raiser(exc: Exception) -> Callable[[Transaction], None]:
    def commit(tx: Transaction) -> None:
        raise exc
    return commit


def _retryable(exc: BaseException) -> bool:
    """Failures of the moment, not of the message: retried, never dead-lettered. A plain
    DatabaseError is a corrupt or unreadable database file (its subclasses
    IntegrityError and ProgrammingError are about the message or the code)."""
    return isinstance(exc, RetryableError | JournalError | sqlite3.OperationalError) or (
        type(exc) is sqlite3.DatabaseError)


def _one_at_a_time(prepare: Prepare) -> PrepareMany:
    """``prepare`` for each message in turn, until ``PREPARE_BUDGET_S`` is spent (a model
    call of seconds is committed alone) or a failure is retryable."""
    def prepare_many(msgs: list[Message]) -> list[Callable[[Transaction], None] | Exception]:
        out: list[Callable[[Transaction], None] | Exception] = []
        started = time.monotonic()
        for msg in msgs:
            try:
                out.append(prepare(msg))
            except Exception as exc:
                out.append(exc)
                if _retryable(exc):
                    break
            if time.monotonic() - started >= PREPARE_BUDGET_S:
                break
        return out
    return prepare_many


def _committer(commit: Callable[[Transaction], None]) -> Handler:
    def handler(msg: Message, tx: Transaction) -> None:
        commit(tx)
    return handler


class _BatchFailed(Exception):
    """A handler raised in an unisolated batch: roll it back, run it isolated."""


@dataclass
class NodeCounters:
    received: int = 0
    applied: int = 0
    applied_live: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    ignored: int = 0
    published: int = 0
    retries: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _StreamState:
    cursor: int
    # seq -> ids seen on the wire for it; the publisher sends each message once, so
    # any id beyond the journaled one's single copy is forged or replayed.
    live: dict[int, list[str]] = field(default_factory=dict)
    seen: list[tuple[int, str]] = field(default_factory=list)  # live copies of applied seqs
    # seq -> id of the last messages applied (the newest _MAX_LIVE_HINTS to twice that): a
    # live copy that arrives after its journal row was pruned is still checked against
    # the right id.
    applied: dict[int, str] = field(default_factory=dict)
    wake: bool = True
    behind: bool = False  # the last journal batch was full: more is waiting
    retry_at: float = 0.0
    failures: int = 0


class BusNode:
    def __init__(
        self,
        name: str,
        config: BusConfig,
        journal: Journal,
        topology: Topology,
        *,
        publishes: Iterable[str] = (),
        context: zmq.Context[Any] | None = None,
        rcvhwm: int = 1000,
        isolate_each: bool = True,
    ) -> None:
        """``isolate_each=False`` lets a batch run without a savepoint per message; a
        failing batch is then run again, isolated, so handlers must have no effects
        outside ``tx`` that would matter if repeated (a model call would).

        ``config.endpoints`` take the place of the topology's; with
        ``config.curve_dir`` every socket is CURVE (``bus/curve.py``), and without it
        an endpoint off loopback is a ConfigError."""
        self.name = name
        self.isolate_each = isolate_each
        self.config = config
        self.journal = journal
        journal.max_payload_bytes = config.max_payload_bytes
        self.topology = topology = topology.with_endpoints(config.endpoints)
        require_keys_off_loopback(topology.endpoints, have_keys=config.curve_dir is not None)
        self.keys = curve.BusKeys.load(config.curve_dir, name) if config.curve_dir else None
        self.counters = NodeCounters()
        self.storage_error: BaseException | None = None
        self.ephemeral_inbox: list[Message] = []
        self._ctx = context or zmq.Context.instance()
        self._last_journal_check = 0.0

        for stream, consumers in topology.consumers.items():
            if stream not in topology.ephemeral:
                journal.declare(stream, consumers)
        self._streams = {
            s: _StreamState(cursor=journal.cursor(name, s)) for s in topology.consumed_by(name)
        }
        self._durable_topics = frozenset(s.encode() for s in topology.durable_streams())

        config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sub: zmq.Socket[bytes] | None = None
        # A CURVE server admits no one without its ZAP handler: that comes first.
        self._zap = self.keys is not None and topology.listens(name)
        if self.keys is not None and self._zap:
            curve.start_authenticator(self._ctx, self.keys)
        try:
            if topology.listens(name):
                self.sub = self._open_sub(rcvhwm)
            self.pub: zmq.Socket[bytes] = self._open_pub(publishes)
        except BaseException:
            self._close_inbound()
            raise
        if self.keys is not None:
            log.info("%s: every bus socket uses CURVE, keys from %s", name, config.curve_dir)

    def _open_sub(self, rcvhwm: int) -> zmq.Socket[bytes]:
        sub: zmq.Socket[bytes] = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, rcvhwm)
        # Far above the application limit, so oversized payloads reach decode()
        # and are dead-lettered with a reason instead of dropped by libzmq.
        sub.setsockopt(zmq.MAXMSGSIZE, max(self.config.max_payload_bytes * 16, 16 << 20))
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            if self.keys is not None:
                curve.serve(sub, self.keys)
            sub.bind(self.topology.endpoint(self.name, self.config.run_dir))
        except BaseException:
            sub.close(0)
            raise
        self.endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
        return sub

    def _open_pub(self, publishes: Iterable[str]) -> zmq.Socket[bytes]:
        pub: zmq.Socket[bytes] = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 500)
        pub.setsockopt(zmq.RECONNECT_IVL, 100)
        pub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        # A connect that gets no answer (the peer's host unreachable) is given up after 2 s
        # and tried afresh; left to the kernel, its SYN is retransmitted 1, 2, 4, ... 64 s
        # apart, so after a 30 s partition a peer was reached ~9 s after the link returned.
        pub.setsockopt(zmq.CONNECT_TIMEOUT, 2000)
        pub.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        pub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        try:
            for peer in self.topology.peers_for(publishes or self.topology.streams,
                                                exclude=self.name):
                endpoint = self.topology.endpoint(peer, self.config.run_dir)
                if self.keys is not None:
                    curve.connect(pub, self.keys, peer, endpoint)
                else:
                    pub.connect(endpoint)
        except BaseException:
            pub.close(0)
            raise
        return pub

    # -- publishing -------------------------------------------------------

    def send(self, messages: Iterable[Message]) -> None:
        # The socket's own send, below pyzmq's Python wrapper: for plain bytes frames the
        # wrapper only checks its routing_id/group options, and three frames a message
        # paid ~0.8 us for those checks (a fifth of the publisher's time in bench-bus).
        send = super(zmq.Socket, self.pub).send
        for msg in messages:
            topic, envelope, payload = msg.frames()
            try:
                send(topic, _SEND_MORE)
                send(envelope, _SEND_MORE)
                send(payload, _SEND_LAST)
            except zmq.Again:
                pass  # the journal has it; the consumer's journal check repairs the drop
            self.counters.published += 1

    def publish(
        self, stream: str, payload: dict[str, Any], *, key: str | None = None
    ) -> Message | None:
        """Journal and send one message; None if ``key`` was published before."""
        with self.journal.transaction() as tx:
            msg = tx.publish(stream, encode_payload(payload), key=key)
        self.send(tx.published)
        return msg

    def send_ephemeral(self, stream: str, payload: dict[str, Any]) -> None:
        msg = Message(stream, 0, f"{self.name}/{time.monotonic_ns()}", self.name, now_ms(),
                      encode_payload(payload))
        self.send([msg])

    # -- receiving --------------------------------------------------------

    def receive(self, timeout_ms: int, max_messages: int = 1000) -> int:
        """Read what the socket has (waiting up to timeout_ms for the first); returns the count.

        While a stream is behind (its last batch from the journal was full), only a
        few live messages are read per call: the journal already has them, reading it
        in bulk is far cheaper than the wire message by message, and what the socket
        drops at its high-water mark meanwhile is exactly what the journal repairs.
        """
        if self.sub is None:
            time.sleep(timeout_ms / 1000)
            return 0
        if any(st.behind for st in self._streams.values()):
            max_messages = min(max_messages, _LIVE_READS_WHILE_BEHIND)
            timeout_ms = 0
        if not self.sub.poll(timeout_ms):
            return 0
        malformed: list[tuple[str, bytes]] = []
        count = 0
        while count < max_messages:
            try:
                frames = self.sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            count += 1
            self.counters.received += 1
            try:
                msg = decode(frames, self.config.max_payload_bytes,
                             check_payload=frames[0] not in self._durable_topics)
            except MalformedMessage as exc:
                malformed.append((exc.reason, b"\x00|".join(frames)))
                continue
            self._note(msg, malformed)
        if malformed:
            self._dead_letter_raw(malformed)
        return count

    def _note(self, msg: Message, malformed: list[tuple[str, bytes]]) -> None:
        if msg.stream in self.topology.ephemeral:
            if self.name in self.topology.consumers.get(msg.stream, ()):
                self.ephemeral_inbox.append(msg)
            self._wake_from_heads(msg)
            return
        state = self._streams.get(msg.stream)
        if state is None:
            if msg.stream in self.topology.consumers:
                self.counters.ignored += 1
            else:
                malformed.append((f"unknown stream {msg.stream!r}", b"".join(msg.frames())))
            return
        if msg.seq == 0:
            malformed.append((f"durable stream {msg.stream!r} message without a sequence number",
                              b"".join(msg.frames())))
            return
        if msg.seq <= state.cursor:
            if len(state.seen) < _MAX_LIVE_HINTS:
                state.seen.append((msg.seq, msg.msg_id))
            return
        if len(state.live) < _MAX_LIVE_HINTS:
            state.live.setdefault(msg.seq, []).append(msg.msg_id)
        state.wake = True

    def _wake_from_heads(self, msg: Message) -> None:
        """A heartbeat carrying a head beyond our cursor means we missed something."""
        try:
            heads = msg.json().get("heads")
        except MalformedMessage:
            return
        if isinstance(heads, dict):
            for stream, head in heads.items():
                state = self._streams.get(stream)
                if state is not None and isinstance(head, int) and head > state.cursor:
                    state.wake = True

    def _dead_letter_raw(self, items: list[tuple[str, bytes]]) -> None:
        with self.journal.transaction() as tx:
            for reason, raw in items:
                tx.dead_letter(self.name, reason, raw)
        self.counters.dead_lettered += len(items)
        for reason, _ in items[:5]:
            log.warning("dead-lettered a malformed message: %s", reason)

    # -- applying ---------------------------------------------------------

    def drain(
        self, handler: Handler, *, max_batches: int = 4, prepare: Prepare | None = None,
        prepare_many: PrepareMany | None = None,
    ) -> int:
        """Apply journaled messages after our cursors; returns how many were applied.

        With ``prepare``, ``prepare(msg)`` runs outside any transaction (so a slow
        model call never holds the journal's write lock) and returns the function
        that commits its result, which then runs in the transaction that advances
        the cursor. Messages are prepared in order until ``PREPARE_BUDGET_S`` has
        been spent, then committed together. A crash in between redoes ``prepare``;
        it must be safe to repeat. ``prepare_many`` does the same for up to
        ``PREPARE_CHUNK`` messages per call (one batch of work for all of them).
        """
        if prepare is not None and prepare_many is None:
            prepare_many = _one_at_a_time(prepare)
        now = time.monotonic()
        if now - self._last_journal_check >= self.config.poll_interval_s:
            self._last_journal_check = now
            for stream, state in self._streams.items():
                if self.journal.head(stream) > state.cursor:
                    state.wake = True
        applied = 0
        for stream, state in self._streams.items():
            if state.seen:
                self._check_duplicates(stream, state)
            batches = 0
            while state.wake and now >= state.retry_at and batches < max_batches:
                batches += 1
                applied += self._apply_batch(stream, state, handler, prepare_many)
        return applied

    def _apply_batch(
        self, stream: str, state: _StreamState, handler: Handler,
        prepare: PrepareMany | None = None,
    ) -> int:
        batch_size = self.config.batch_size
        rows = self.journal.read_after(stream, state.cursor, batch_size)
        if not rows:
            self._reject_unjournaled(stream, state)
            state.wake = state.behind = False
            return 0
        more = len(rows) == batch_size
        retry = False
        if prepare is not None:
            prepared, retry = self._prepare_rows(stream, rows, prepare)
            if not prepared:
                self._schedule_retry(state)
                return 0
            more = more or len(prepared) < len(rows)
            rows = [msg for msg, _ in prepared.values()]
            handler = self._committer_of(prepared)
        done: list[Message] = []
        failed: list[tuple[Message, str]] = []
        outputs: list[Message] = []
        # Unisolated first when allowed: one pass, no savepoint per message. If a
        # handler raises, that whole transaction is rolled back and the batch runs
        # again with a savepoint around each message.
        for isolate in ((True,) if self.isolate_each else (False, True)):
            try:
                with self.journal.transaction() as tx:
                    done, failed, stopped = self._run_handlers(
                        tx, stream, rows, handler, isolate)
                    if done:
                        tx.advance_cursor(self.name, stream, done[-1].seq)
                    outputs = tx.published
                retry = retry or stopped
                break
            except _BatchFailed:
                continue
            except JournalError as exc:
                log.error("journal transaction failed on %s: %s", stream, exc)
                self.storage_error = exc
                retry = True
                done, failed, outputs = [], [], []
                break
        self.send(outputs)
        if done:
            state.cursor = done[-1].seq
        self.counters.applied += len(done) - len(failed)
        self.counters.dead_lettered += len(failed)
        self._confirm_live(stream, state, done)
        for msg in done:
            state.applied[msg.seq] = msg.msg_id
        if len(state.applied) > 2 * _MAX_LIVE_HINTS:
            # The newest _MAX_LIVE_HINTS kept, in one pass: deleting the oldest one at a
            # time made each next(iter(...)) skip every slot deleted before it (bench-bus:
            # 0.6 of the consumer's 1.2 s).
            state.applied = dict(itertools.islice(
                state.applied.items(), len(state.applied) - _MAX_LIVE_HINTS, None))
        if retry:
            self._schedule_retry(state)
        else:
            state.failures = 0
            state.retry_at = 0.0
            state.behind = more
            state.wake = state.behind or bool(state.live)
        return len(done)

    def _confirm_live(self, stream: str, state: _StreamState, done: list[Message]) -> None:
        """Live copies of applied messages are confirmed; others at their seq are not ours."""
        unconfirmed: list[tuple[str, bytes]] = []
        for msg in done:
            live_ids = state.live.pop(msg.seq, None)
            if live_ids is None:
                continue
            if msg.msg_id in live_ids:
                self.counters.applied_live += 1
                live_ids.remove(msg.msg_id)
            unconfirmed += [(f"live message id {mid!r} at {stream} seq {msg.seq} is not the"
                             f" journaled one ({msg.msg_id!r}) or a repeated copy", b"")
                            for mid in live_ids]
        if unconfirmed:
            self._dead_letter_raw(unconfirmed)

    def _prepare_rows(
        self, stream: str, rows: list[Message], prepare: PrepareMany
    ) -> tuple[dict[int, tuple[Message, Handler]], bool]:
        """Prepare ``rows`` in order within the budget: ({seq: (message, commit)},
        whether a retryable failure stopped it; the failed message is not included)."""
        prepared: dict[int, tuple[Message, Handler]] = {}
        started = time.monotonic()
        for lo in range(0, len(rows), PREPARE_CHUNK):
            chunk = rows[lo:lo + PREPARE_CHUNK]
            try:
                results = prepare(chunk)
            except Exception as exc:  # the whole chunk failed: a retry, or a bug
                results = [exc] * len(chunk)
            for msg, result in zip(chunk, results, strict=False):
                if isinstance(result, Exception):
                    if _retryable(result):
                        log.warning("will retry %s seq %d: %s", stream, msg.seq, result)
                        self._note_storage_error(result)
                        return prepared, True
                    # Dead-lettered in the transaction, like a handler error.
                    result = _raiser(result)
                prepared[msg.seq] = (msg, _committer(result))
            if len(results) < len(chunk) or time.monotonic() - started >= PREPARE_BUDGET_S:
                break
        return prepared, False

    @staticmethod
    def _committer_of(prepared: dict[int, tuple[Message, Handler]]) -> Handler:
        def handler(msg: Message, tx: Transaction) -> None:
            prepared[msg.seq][1](msg, tx)
        return handler

    def _note_storage_error(self, exc: BaseException) -> None:
        if isinstance(exc, JournalError | sqlite3.DatabaseError):
            self.storage_error = exc

    def take_storage_error(self) -> BaseException | None:
        """The last database failure that made a message wait for a retry (then cleared):
        the process reports it, since a retried message shows nothing else."""
        exc, self.storage_error = self.storage_error, None
        return exc

    def _schedule_retry(self, state: _StreamState) -> None:
        state.failures += 1
        self.counters.retries += 1
        state.retry_at = time.monotonic() + _RETRY_BACKOFF_S[
            min(state.failures, len(_RETRY_BACKOFF_S)) - 1]

    def _run_handlers(
        self, tx: Transaction, stream: str, rows: list[Message], handler: Handler, isolate: bool
    ) -> tuple[list[Message], list[tuple[Message, str]], bool]:
        """Run ``handler`` on each row; returns (done, dead-lettered, stopped for a retry)."""
        done: list[Message] = []
        failed: list[tuple[Message, str]] = []
        for msg in rows:
            try:
                if isolate:
                    with tx.savepoint():
                        handler(msg, tx)
                else:
                    handler(msg, tx)
            except Exception as exc:  # the loop never dies of one message
                if not isolate:
                    raise _BatchFailed from exc
                if _retryable(exc):
                    log.warning("will retry %s seq %d: %s", stream, msg.seq, exc)
                    self._note_storage_error(exc)
                    return done, failed, True
                if isinstance(exc, InvalidPayload | MalformedMessage):
                    reason = exc.reason
                else:
                    reason = f"handler error: {type(exc).__name__}: {exc}"
                    log.error("%s\n%s", reason, traceback.format_exc())
                failed.append((msg, reason))
                tx.dead_letter(self.name, reason, msg.payload, stream=stream, msg_id=msg.msg_id)
            done.append(msg)
        return done, failed, False

    def _check_duplicates(self, stream: str, state: _StreamState) -> None:
        """Live copies of applied messages are dropped; forged ones are dead-lettered."""
        seen, state.seen = state.seen, []
        lo, hi = min(s for s, _ in seen), max(s for s, _ in seen)
        journaled = self.journal.ids_between(stream, lo, hi)
        forged = []
        for seq, msg_id in seen:
            expected = journaled.get(seq) or state.applied.get(seq)
            if expected == msg_id:
                self.counters.duplicates += 1
            elif expected is None:  # applied long ago and pruned: not a copy we can vouch for
                forged.append((f"live message id {msg_id!r} at {stream} seq {seq} cannot be"
                               " checked: that seq was applied and pruned long ago", b""))
            else:
                forged.append((f"live message id {msg_id!r} does not match journal id "
                               f"{expected!r} at {stream} seq {seq}", b""))
        if forged:
            self._dead_letter_raw(forged)

    def _reject_unjournaled(self, stream: str, state: _StreamState) -> None:
        """Live messages beyond the journal head were never journaled: not ours to apply."""
        if state.live:
            items = [(f"{stream} seq {seq} (id {mid!r}) is not in the journal", b"")
                     for seq, ids in sorted(state.live.items()) for mid in ids]
            state.live.clear()
            self._dead_letter_raw(items)

    # -- status -----------------------------------------------------------

    def cursors(self) -> dict[str, int]:
        return {s: st.cursor for s, st in self._streams.items()}

    def heads(self) -> dict[str, int]:
        heads = self.journal.heads()
        return {s: heads.get(s, 0) for s in self._streams}

    def backlog(self) -> int:
        heads = self.heads()
        return sum(heads[s] - st.cursor for s, st in self._streams.items())

    def close(self) -> None:
        self.pub.close()
        self._close_inbound()

    def _close_inbound(self) -> None:
        """Also what a constructor that failed half way leaves: no socket or ZAP thread."""
        if self.sub is not None:
            self.sub.close(0)
        if self._zap:
            curve.stop_authenticator(self._ctx)
