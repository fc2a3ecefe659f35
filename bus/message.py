"""The wire format: three frames ``[topic, envelope, payload]``.

``topic`` is the stream name (ASCII). ``envelope`` is a JSON object
``{"v": 1, "id": str, "stream": str, "seq": int, "ts_ms": int, "src": str}``;
``seq`` is the per-stream sequence number (0 for ephemeral messages such as
heartbeats, which are never journaled). ``payload`` is a UTF-8 JSON object.

:func:`decode` validates every part and raises :class:`MalformedMessage` with a
reason a human can act on; the caller dead-letters it.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, NamedTuple

from trinity.errors import MalformedMessage

ENVELOPE_VERSION = 1
MAX_ID_LEN = 128
MAX_ENVELOPE_BYTES = 1024


class Message(NamedTuple):
    """One message; a tuple because the bus makes one per message on its hot paths."""

    stream: str
    seq: int
    msg_id: str
    source: str
    ts_ms: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object; raises MalformedMessage if it is not one."""
        return decode_payload(self.payload)

    def frames(self) -> list[bytes]:
        # Byte for byte what json.dumps(envelope, separators=(",", ":")) gives, at a
        # third of the cost: this runs once per message sent.
        envelope = (
            f'{{"v":{ENVELOPE_VERSION:d},"id":{_json_str(self.msg_id)},'
            f'"stream":{_json_str(self.stream)},"seq":{self.seq:d},"ts_ms":{self.ts_ms:d},'
            f'"src":{_json_str(self.source)}}}'
        )
        return [self.stream.encode("ascii"), envelope.encode("ascii"), self.payload]


# json.dumps with non-default options builds a new encoder on every call.
_PAYLOAD_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_payload(payload: dict[str, Any]) -> bytes:
    return _PAYLOAD_ENCODER.encode(payload).encode("utf-8")


def decode_payload(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"payload is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedMessage(
            f"payload is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit conversion limit
        raise MalformedMessage(f"payload is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessage("payload JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"payload must be a JSON object, got {type(value).__name__}")
    return value


def _require(envelope: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in envelope:
        raise MalformedMessage(f"envelope is missing {key!r}")
    value = envelope[key]
    # bool is an int subclass; a boolean seq or timestamp is a type error.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedMessage(
            f"envelope field {key!r} must be {what}, got {type(value).__name__}"
        )
    return value


def decode(  # noqa: C901 - one check per field, each with its own reason
    frames: list[bytes], max_payload_bytes: int, *, check_payload: bool = True
) -> Message:
    """Validate a received frame set and return the message it carries.

    ``check_payload=False`` skips parsing the payload: a consumer applies durable
    messages from the journal, never from the wire, so their live copies' payloads
    are not read (the handler validates the journaled one).
    """
    if len(frames) != 3:
        raise MalformedMessage(f"expected 3 frames [topic, envelope, payload], got {len(frames)}")
    topic_raw, envelope_raw, payload = frames
    try:
        topic = topic_raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedMessage("topic is not ASCII") from None
    if not topic or not topic.isprintable():
        raise MalformedMessage("topic is empty or not printable")
    if len(envelope_raw) > MAX_ENVELOPE_BYTES:
        raise MalformedMessage(
            f"envelope is {len(envelope_raw)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit"
        )
    if len(payload) > max_payload_bytes:
        raise MalformedMessage(
            f"payload is {len(payload)} bytes, over the {max_payload_bytes}-byte limit"
        )
    try:
        envelope = json.loads(envelope_raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MalformedMessage("envelope is not valid UTF-8 JSON") from None
    if not isinstance(envelope, dict):
        raise MalformedMessage(f"envelope must be a JSON object, got {type(envelope).__name__}")
    version = _require(envelope, "v", int, "an integer")
    if version != ENVELOPE_VERSION:
        raise MalformedMessage(f"unsupported envelope version {version}")
    msg_id = _require(envelope, "id", str, "a string")
    if not 0 < len(msg_id) <= MAX_ID_LEN:
        raise MalformedMessage(f"message id must be 1..{MAX_ID_LEN} characters")
    stream = _require(envelope, "stream", str, "a string")
    if stream != topic:
        raise MalformedMessage(f"envelope stream {stream!r} does not match topic {topic!r}")
    seq = _require(envelope, "seq", int, "an integer")
    if seq < 0:
        raise MalformedMessage(f"sequence number must be >= 0, got {seq}")
    ts_ms = _require(envelope, "ts_ms", int, "an integer")
    source = _require(envelope, "src", str, "a string")
    if check_payload:
        decode_payload(payload)  # the payload must be a UTF-8 JSON object, as documented above
    return Message(topic, seq, msg_id, source, ts_ms, payload)
