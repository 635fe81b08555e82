"""Payload encoding for offloaded calls: JSON by default, msgpack on request, signed pickle.

Every payload starts with one format byte, so a worker decodes whatever a web process sent
(as long as it is allowed to):

- ``j`` JSON. Values: ``None``, bool, int, float, str, bytes (kept exact), list/tuple
  (a tuple comes back as a list) and dicts with str keys. Anything else is a ``TypeError``
  at encoding time, naming the type and what to do.
- ``m`` msgpack (when installed, ``pip install msgpack``): the same types, faster and more
  compact; bytes are native.
- ``p`` pickle, **only** with a secret key: the payload carries an HMAC-SHA256 of the
  pickle, checked before anything is unpickled. Without the key (or with a wrong one) a
  pickle payload is refused: whoever can reach a job server could otherwise run code on
  every worker.

A payload that cannot be decoded raises ``PayloadError`` (a ``ValueError``); in a worker
task that becomes a clean WORK_EXCEPTION, never a crashed worker.

Example::

    from gearoffload.codec import Codec

    codec = Codec()                                   # JSON
    data = codec.dumps({"month": "2026-11", "raw": b"\\x00\\xff"})
    assert codec.loads(data) == {"month": "2026-11", "raw": b"\\x00\\xff"}

    signed = Codec("pickle", secret_key="a long random string")
    assert signed.loads(signed.dumps({1, 2})) == {1, 2}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FORMATS", "Codec", "PayloadError", "sign_payload", "stable_hash", "verify_payload"]

FORMATS = ("json", "msgpack", "pickle")
_MARK = {"json": b"j", "msgpack": b"m", "pickle": b"p"}
_SIG_LEN = 32  # HMAC-SHA256
#: The JSON key that marks an encoded value: a NUL cannot appear in a sane key by accident.
_TAG = "\0"


class PayloadError(ValueError):
    """A payload could not be decoded (unknown format, corrupt, unsigned or forged)."""


def _json_default(value: Any) -> Any:
    raise TypeError(
        f"cannot encode {type(value).__name__} as JSON: pass str/bytes/int/float/bool/None/"
        "list/dict, or configure msgpack, or pickle with a secret key")


def _tag(value: Any) -> Any:
    """Turn bytes (and dicts that look like tags) into JSON-safe tagged dicts."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_TAG: ["b", base64.b64encode(bytes(value)).decode("ascii")]}
    if isinstance(value, (list, tuple)):
        return [_tag(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON payloads need str dict keys, not {type(key).__name__} "
                                f"({key!r}): convert the keys, or use msgpack/pickle")
            out[key] = _tag(item)
        return {_TAG: ["d", out]} if _TAG in out else out
    return _json_default(value)


def _untag(value: Any) -> Any:
    if isinstance(value, list):
        return [_untag(v) for v in value]
    if isinstance(value, dict):
        tagged = value.get(_TAG)
        if tagged is not None and len(value) == 1:
            kind, body = tagged
            if kind == "b":
                return base64.b64decode(body, validate=True)
            if kind == "d":
                return {k: _untag(v) for k, v in body.items()}
            raise PayloadError(f"unknown JSON tag {kind!r}")
        return {k: _untag(v) for k, v in value.items()}
    return value


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise RuntimeError("format 'msgpack' needs the msgpack package: pip install msgpack "
                           "(or use the default 'json')") from None
    return msgpack


@dataclass(frozen=True)
class Codec:
    """Encodes call arguments and results as bytes, and back.

    ``format`` is what ``dumps`` writes: ``"json"`` (default), ``"msgpack"`` or
    ``"pickle"`` (needs ``secret_key``). ``loads`` accepts JSON and msgpack always, and
    pickle only when ``secret_key`` is set and the signature matches.

    Example::

        codec = Codec("msgpack")
        assert codec.loads(codec.dumps([1, b"two"])) == [1, b"two"]
    """

    format: str = "json"
    secret_key: bytes | str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"payload format must be one of {', '.join(FORMATS)}, "
                             f"not {self.format!r}")
        if isinstance(self.secret_key, str):
            object.__setattr__(self, "secret_key", self.secret_key.encode())
        if self.format == "pickle" and not self.secret_key:
            raise ValueError("the pickle format needs a secret key (GEAROFFLOAD_SECRET_KEY / "
                             "secret_key=...): unsigned pickles would let anyone who reaches "
                             "the job server run code on the workers")
        if self.format == "msgpack":
            _msgpack()

    def _sign(self, body: bytes) -> bytes:
        assert self.secret_key
        return hmac.new(self.secret_key, b"gearoffload-pickle\0" + body, hashlib.sha256).digest()

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; ``TypeError`` if the format cannot carry it."""
        if self.format == "json":
            return b"j" + json.dumps(_tag(value), separators=(",", ":"), allow_nan=True,
                                     default=_json_default).encode()
        if self.format == "msgpack":
            return b"m" + _msgpack().packb(value, use_bin_type=True, datetime=False)
        body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return b"p" + self._sign(body) + body

    def loads(self, data: bytes) -> Any:
        """Decode a payload from ``dumps`` (of any allowed format); ``PayloadError`` if it
        is not one."""
        if not data:
            raise PayloadError("empty payload")
        mark, body = data[:1], data[1:]
        try:
            if mark == b"j":
                return _untag(json.loads(body))
            if mark == b"m":
                msgpack = _msgpack()
                return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except PayloadError:
            raise
        except RuntimeError as exc:  # msgpack missing on this side
            raise PayloadError(str(exc)) from None
        except Exception as exc:
            raise PayloadError(f"corrupt {'JSON' if mark == b'j' else 'msgpack'} payload: "
                               f"{type(exc).__name__}: {exc}") from None
        if mark == b"p":
            if not self.secret_key:
                raise PayloadError("refusing a pickle payload: no secret key is configured "
                                   "here (set the same GEAROFFLOAD_SECRET_KEY on both sides)")
            signature, pickled = body[:_SIG_LEN], body[_SIG_LEN:]
            if len(signature) != _SIG_LEN or not hmac.compare_digest(signature,
                                                                     self._sign(pickled)):
                raise PayloadError("refusing a pickle payload with a bad signature (a "
                                   "different secret key, or a forged payload)")
            try:
                return pickle.loads(pickled)
            except Exception as exc:
                raise PayloadError(f"corrupt pickle payload: {type(exc).__name__}: {exc}") \
                    from None
        raise PayloadError(f"unknown payload format byte {mark!r} (not a gearoffload payload)")


def sign_payload(secret_key: bytes | str, data: bytes) -> bytes:
    """Wrap ``data`` with an HMAC-SHA256 of it (``verify_payload`` unwraps it).

    Used for the web layer's request payloads when a secret key is configured, so that a
    worker runs only requests that a web process with the key sent.

    Example::

        assert verify_payload("k", sign_payload("k", b"jdata")) == b"jdata"
    """
    key = secret_key.encode() if isinstance(secret_key, str) else secret_key
    mac = hmac.new(key, b"gearoffload-signed\0" + data, hashlib.sha256).digest()
    return b"s" + mac + data


def verify_payload(secret_key: bytes | str | None, data: bytes) -> bytes:
    """The payload inside ``sign_payload``'s output; ``PayloadError`` if it is unsigned,
    signed with another key, or tampered with. Without a key, unsigned payloads pass and
    signed ones are refused (the sender has a key this side lacks)."""
    if not secret_key:
        if data[:1] == b"s":
            raise PayloadError("refusing a signed payload: no secret key is configured here "
                               "(set the same GEAROFFLOAD_SECRET_KEY on both sides)")
        return data
    if data[:1] != b"s" or len(data) < 1 + _SIG_LEN:
        raise PayloadError("refusing an unsigned payload: this side has a secret key, so "
                           "every request must be signed with it")
    key = secret_key.encode() if isinstance(secret_key, str) else secret_key
    inner = data[1 + _SIG_LEN:]
    mac = hmac.new(key, b"gearoffload-signed\0" + inner, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, data[1:1 + _SIG_LEN]):
        raise PayloadError("refusing a payload with a bad signature (a different secret key, "
                           "or a forged payload)")
    return inner


def stable_hash(*parts: Any) -> str:
    """A short, stable hex digest of JSON-able ``parts`` (bytes allowed): the same values
    give the same digest in every process and Python version. Falls back to ``repr`` for
    values JSON cannot carry.

    Example::

        assert stable_hash("f", [1, 2], {"b": 1, "a": 2}) == \\
            stable_hash("f", (1, 2), {"a": 2, "b": 1})
    """
    try:
        text = json.dumps(_tag(list(parts)), sort_keys=True, separators=(",", ":"))
    except TypeError:
        text = repr(parts)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()
