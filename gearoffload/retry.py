"""A job's retry policy, carried in the job itself so that every server and worker agrees.

``@offload(retries=3, backoff=2)`` declares how often a failed background job runs again
and how long the job server waits in between. The declaration travels as one short line
in front of the job's data: the job server reads it when an attempt fails (never on the
hot path), and the worker strips it before it opens the seal. The format is in
docs/protocol.md, "Extension: per-job retry policy"::

    GOR1 <retries> <backoff> <backoff_max> <jitter>\\n<sealed job>

Pure: no I/O, used by the client (``Offloader.start``) and the job server alike.

Example::

    >>> policy = RetryPolicy(retries=3, backoff=2.0, backoff_max=60.0, jitter=False)
    >>> data = policy.wrap(b"GO1.job")
    >>> data
    b'GOR1 3 2 60 0\\nGO1.job'
    >>> RetryPolicy.parse(data) == policy, RetryPolicy.strip(data)
    (True, b'GO1.job')
    >>> [policy.delay(n) for n in (1, 2, 3, 10)]
    [2.0, 4.0, 8.0, 60.0]
"""
from __future__ import annotations

import numbers
import random
from datetime import timedelta
from typing import NamedTuple

#: What a job with a retry policy starts with.
MAGIC = b"GOR1 "
#: Bounds, the same on both sides: a header outside them is ignored by the server.
MAX_RETRIES = 1000
MAX_BACKOFF = 86400.0
_MAX_HEADER = 80


class RetryPolicy(NamedTuple):
    """How often a failed background job runs again, and after how long.

    The ``n``-th retry waits ``backoff * 2 ** (n - 1)`` seconds, at most ``backoff_max``;
    with ``jitter``, a random part of that (between half and all of it), so that jobs that
    failed together do not come back together.
    """

    retries: int = 0
    backoff: float = 1.0
    backoff_max: float = 300.0
    jitter: bool = True

    def check(self) -> RetryPolicy:
        """``self``; ``ValueError`` naming the bad setting."""
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or \
                not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(f"retries must be an int between 0 and {MAX_RETRIES}, "
                             f"not {self.retries!r}")
        for name in ("backoff", "backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 <= value <= MAX_BACKOFF:
                raise ValueError(f"{name} must be between 0 and {MAX_BACKOFF:g} seconds, "
                                 f"not {value!r}")
        return self

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        delay = min(self.backoff_max, self.backoff * (1 << min(retry - 1, 40)))
        if self.jitter:
            delay = random.uniform(delay / 2, delay)
        return delay

    def wrap(self, data: bytes) -> bytes:
        """``data`` with this policy in front (``data`` unchanged for no retries)."""
        if not self.retries:
            return data
        return b"%s%d %s %s %d\n%s" % (MAGIC, self.retries, _num(self.backoff),
                                       _num(self.backoff_max), self.jitter, data)

    @classmethod
    def parse(cls, data: bytes) -> RetryPolicy | None:
        """The policy ``data`` carries; ``None`` if it carries none or a malformed one."""
        if not data.startswith(MAGIC):
            return None
        end = data.find(b"\n", 0, _MAX_HEADER)
        if end < 0:
            return None
        words = data[len(MAGIC):end].split(b" ")
        if len(words) != 4:
            return None
        try:
            policy = cls(int(words[0]), float(words[1]), float(words[2]), words[3] == b"1")
            return policy.check()
        except ValueError:
            return None

    @staticmethod
    def strip(data: bytes) -> bytes:
        """``data`` without its policy line, if it has one."""
        if data.startswith(MAGIC):
            end = data.find(b"\n", 0, _MAX_HEADER)
            if end >= 0:
                return data[end + 1:]
        return data


def retry_policy(retries: int = 0, backoff: float | timedelta | None = None,
                 backoff_max: float | timedelta | None = None,
                 jitter: bool | None = None) -> RetryPolicy | None:
    """The checked policy a decorator declares; ``None`` for ``retries=0`` (no retries,
    and no line in front of the job). A setting left at ``None`` takes its default
    (``backoff=1``, ``backoff_max=300``, ``jitter=True``). Refused when the decorator
    runs, not when the first job fails: a wrong type (``TypeError``: ``retries="3"``,
    ``jitter="no"``), a value out of range, ``backoff_max`` below ``backoff``, or
    ``backoff``/``backoff_max``/``jitter`` without ``retries`` (they would do nothing).

    >>> retry_policy(0) is None
    True
    >>> retry_policy(3, backoff=2)
    RetryPolicy(retries=3, backoff=2.0, backoff_max=300.0, jitter=True)
    >>> retry_policy(-1)
    Traceback (most recent call last):
    ...
    ValueError: retries= must be between 0 and 1000, not -1
    """
    from .checks import duration, flag

    if isinstance(retries, bool) or not isinstance(retries, numbers.Integral):
        raise TypeError(f"retries= must be an int, not {type(retries).__name__} {retries!r}")
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries= must be between 0 and {MAX_RETRIES}, not {retries!r}")
    given = [name for name, value in (("backoff", backoff), ("backoff_max", backoff_max),
                                      ("jitter", jitter)) if value is not None]
    defaults = RetryPolicy()
    low = duration("backoff", defaults.backoff if backoff is None else backoff,
                   maximum=MAX_BACKOFF)
    high = duration("backoff_max", defaults.backoff_max if backoff_max is None
                    else backoff_max, maximum=MAX_BACKOFF)
    jitter = flag("jitter", defaults.jitter if jitter is None else jitter)
    if given and not retries:
        raise ValueError(f"{'= and '.join(given)}= apply to retries: give retries=N (N >= 1) "
                         "too, or leave them out")
    if high < low:
        raise ValueError(f"backoff_max= ({high:g} s) is below backoff= ({low:g} s): it is "
                         "the longest wait between two attempts")
    if not retries:
        return None
    return RetryPolicy(int(retries), low, high, jitter).check()


def _num(value: float) -> bytes:
    return b"%d" % value if value == int(value) else b"%r" % value
