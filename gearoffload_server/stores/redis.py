"""The shared store: background jobs in a Redis the team already runs.

Two keys per server, under its prefix (``gearoffload:PORT`` unless ``?prefix=`` says
otherwise, so that several servers share one Redis without seeing each other's jobs):

- ``PREFIX:jobs`` — a hash, field = the store-generated job id (decimal; never
  function+unique, docs/protocol.md Q11), value = the packed row (``_pack``);
- ``PREFIX:dead`` — a set of the ids that are dead letters;
- ``PREFIX:handles`` — a hash, field = job id, value = the job's handle (kept across a
  restart; rows saved by older versions have none and get a fresh one);
- ``PREFIX:deadinfo`` — a hash, field = the id of a dead letter, value = when it died,
  its attempts and its last error (``_pack_dead``);
- ``PREFIX:lasthandle`` — the highest handle number the server issued (written with each
  batch), so that handles after a restart continue past it;
- ``PREFIX:results`` — a hash, field = the store-generated id of a kept result of a
  background job (``--result-ttl``), value = the packed result with its unique
  (``_pack_result``); expired ones are deleted after start-up.

One batch is one ``MULTI``/``EXEC`` pipeline: a burst of submissions costs one round
trip. ``load()`` sorts the ids: ids grow with every submission, so that is submission
order (the state rebuilds priority queues from it, as for sqlite).

Durability is Redis's own: JOB_CREATED leaves once ``EXEC`` has returned, i.e. the rows
are in Redis's memory; they survive a Redis restart as far as its persistence is
configured (``appendonly yes`` with ``appendfsync always`` matches sqlite's
``synchronous=full``, ``everysec`` loses up to a second on a power cut).

Writes run in a thread of gevent's pool; the connection uses the unpatched socket module
so it does not depend on which pool thread (or the main thread, for ``load``) uses it.
"""

from __future__ import annotations

import itertools
import struct
from urllib.parse import urlsplit

from . import Batch, QueueStore, ResultRow, StoredJob, StoreError

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - the optional extra is missing
    redis = None

# priority, when, len(function), len(unique), len(reducer) or NO_REDUCER; then the bytes
_HEAD = struct.Struct("!BqIII")
_NO_REDUCER = 0xFFFFFFFF


def _pack(row: tuple) -> bytes:
    _id, function, unique, priority, data, when, reducer = row[:7]  # the handle: apart
    return b"".join((
        _HEAD.pack(priority, when, len(function), len(unique),
                   _NO_REDUCER if reducer is None else len(reducer)),
        function, unique, reducer or b"", data))


# state index, numerator, denominator, expires, too_large, has data, len(unique); then
# the unique and the data
_RESULT_HEAD = struct.Struct("!BIIdQBH")
_RESULT_STATES = (b"done", b"failed", b"dead")


def _pack_result(row: tuple) -> bytes:
    _id, unique, state, numerator, denominator, expires, data, too_large = row
    return b"".join((
        _RESULT_HEAD.pack(_RESULT_STATES.index(state), numerator, denominator, expires,
                          too_large, data is not None, len(unique)),
        unique, data or b""))


def _unpack_result(ident: int, raw: bytes) -> ResultRow:
    state, numerator, denominator, expires, too_large, has_data, nu = \
        _RESULT_HEAD.unpack_from(raw)
    at = _RESULT_HEAD.size
    unique = raw[at:at + nu]
    data = raw[at + nu:] if has_data else None
    return ResultRow(ident, unique, _RESULT_STATES[state], numerator, denominator, expires,
                     data, too_large)


def _unpack(ident: int, raw: bytes, dead: int) -> StoredJob:
    priority, when, nf, nu, nr = _HEAD.unpack_from(raw)
    at = _HEAD.size
    function = raw[at:at + nf]
    at += nf
    unique = raw[at:at + nu]
    at += nu
    reducer = None
    if nr != _NO_REDUCER:
        reducer = raw[at:at + nr]
        at += nr
    return StoredJob(ident, function, unique, priority, raw[at:], when, reducer, dead=dead)


# died (epoch seconds), attempts, failures; then the last error
_DEAD_HEAD = struct.Struct("!dII")


def _pack_dead(died: float, attempts: int, failures: int, error: bytes) -> bytes:
    return _DEAD_HEAD.pack(died, attempts, failures) + error


def _unpack_dead(raw: bytes) -> tuple[float, int, int, bytes]:
    died, attempts, failures = _DEAD_HEAD.unpack_from(raw)
    return died, attempts, failures, raw[_DEAD_HEAD.size:]


def _original_socket():
    """The socket module's own ``socket`` and ``getaddrinfo``, not gevent's."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover
        import socket
        return socket.socket, socket.getaddrinfo
    return tuple(monkey.get_original("socket", ["socket", "getaddrinfo"]))


if redis is not None:
    class _Connection(redis.Connection):
        """A plain blocking socket, usable from any thread."""

        def _connect(self):
            import socket

            make, getaddrinfo = _original_socket()
            err: OSError | None = None
            for family, socktype, proto, _, address in getaddrinfo(
                    self.host, self.port, 0, socket.SOCK_STREAM):
                sock = make(family, socktype, proto)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.settimeout(self.socket_connect_timeout)
                    sock.connect(address)
                    sock.settimeout(self.socket_timeout)
                    return sock
                except OSError as exc:
                    err = exc
                    sock.close()
            raise err or OSError(f"cannot resolve {self.host}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class RedisStore(QueueStore):
    def __init__(self, url: str, prefix: str) -> None:
        super().__init__()
        if redis is None:
            raise StoreError("the redis queue store needs the redis package: "
                             "pip install 'gearoffload[redis]'")
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 6379
        self.db = int(parts.path.lstrip("/") or 0)
        self.prefix = prefix
        self.jobs_key = f"{prefix}:jobs"
        self.dead_key = f"{prefix}:dead"
        self.results_key = f"{prefix}:results"
        self.handles_key = f"{prefix}:handles"
        self.dead_info_key = f"{prefix}:deadinfo"
        self.last_handle_key = f"{prefix}:lasthandle"
        pool = redis.ConnectionPool(
            connection_class=_Connection, host=self.host, port=self.port, db=self.db,
            username=parts.username or None, password=parts.password or None,
            socket_connect_timeout=3.0, socket_timeout=5.0,
            retry=Retry(NoBackoff(), 1),  # one reconnect, e.g. after a Redis restart
            max_connections=4)
        self.client = redis.Redis(connection_pool=pool)
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StoreError(f"cannot reach the redis queue at {self.describe_where()}: "
                             f"{_one_line(exc)}") from None

    def describe_where(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"

    def describe(self) -> str:
        return f"redis {self.describe_where()} prefix {self.prefix}"

    def load(self) -> list[StoredJob]:
        try:
            rows = self.client.hgetall(self.jobs_key)
            dead = {int(i) for i in self.client.smembers(self.dead_key)}
            handles = {int(i): h for i, h in self.client.hgetall(self.handles_key).items()}
            dead_info = {int(i): _unpack_dead(raw) for i, raw in
                         self.client.hgetall(self.dead_info_key).items()}
            self.last_handle = int(self.client.get(self.last_handle_key) or 0)
        except redis.RedisError as exc:
            raise StoreError(f"cannot read the redis queue at {self.describe_where()} "
                             f"({self.jobs_key}): {_one_line(exc)}") from None
        except (ValueError, struct.error):
            raise StoreError(f"{self.jobs_key} in {self.describe_where()} is not a "
                             "gearoffload queue; use another ?prefix=") from None
        try:
            jobs = sorted((int(i), raw) for i, raw in rows.items())
            result = []
            for i, raw in jobs:
                row = _unpack(i, raw, int(i in dead))._replace(handle=handles.get(i, b""))
                if i in dead_info:
                    died, attempts, failures, error = dead_info[i]
                    row = row._replace(died=died, attempts=attempts, failures=failures,
                                       error=error)
                result.append(row)
        except (ValueError, struct.error):
            raise StoreError(f"{self.jobs_key} in {self.describe_where()} is not a "
                             "gearoffload queue; use another ?prefix=") from None
        self._ids = itertools.count(result[-1].id + 1 if result else 1)
        return result

    def load_results(self, now: float) -> list[ResultRow]:
        try:
            raw = self.client.hgetall(self.results_key)
        except redis.RedisError as exc:
            raise StoreError(f"cannot read kept results from {self.describe_where()} "
                             f"({self.results_key}): {_one_line(exc)}") from None
        rows = []
        for field, value in raw.items():
            try:
                ident = int(field)
            except ValueError:
                continue  # not ours: left alone
            try:
                rows.append(_unpack_result(ident, value))
            except (IndexError, struct.error):
                # Not a result of ours: returned as expired, so that it is deleted.
                rows.append(ResultRow(ident, b"", b"dead", 0, 0, 0.0, None, 0))
        rows.sort()
        self._result_ids = itertools.count(rows[-1].id + 1 if rows else 1)
        return rows

    def write(self, batch: Batch) -> None:
        pipe = self.client.pipeline(transaction=True)
        if batch.result_puts:
            pipe.hset(self.results_key,
                      mapping={row[0]: _pack_result(row) for row in batch.result_puts})
        if batch.result_drops:
            pipe.hdel(self.results_key, *batch.result_drops)
        if batch.saves:
            pipe.hset(self.jobs_key, mapping={row[0]: _pack(row) for row in batch.saves})
            pipe.hset(self.handles_key, mapping={row[0]: row[7] for row in batch.saves})
        for dead, died, attempts, failures, error, ident in batch.marks:
            if dead:
                pipe.sadd(self.dead_key, ident)
                pipe.hset(self.dead_info_key, ident,
                          _pack_dead(died, attempts, failures, error))
            else:
                pipe.srem(self.dead_key, ident)
                pipe.hdel(self.dead_info_key, ident)
        if batch.deletes:
            pipe.hdel(self.jobs_key, *batch.deletes)
            pipe.hdel(self.handles_key, *batch.deletes)
            pipe.srem(self.dead_key, *batch.deletes)
            pipe.hdel(self.dead_info_key, *batch.deletes)
        if batch.last_handle:
            pipe.set(self.last_handle_key, batch.last_handle)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"redis queue {self.describe_where()}: {_one_line(exc)}") from None
        finally:
            pipe.reset()

    def close(self) -> None:
        try:
            self.client.close()
            self.client.connection_pool.disconnect()
        except Exception:
            pass
