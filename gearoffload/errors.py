"""The exceptions that cross layers: one small, flat hierarchy.

Example::

    from gearoffload.errors import GearmanError, ProtocolError
    try:
        ...
    except ProtocolError as exc:
        print(exc.code, exc)
"""

from __future__ import annotations


class GearmanError(Exception):
    """Base class of every error gearoffload raises."""


class ProtocolError(GearmanError):
    """A peer sent bytes that are not valid Gearman protocol.

    ``code`` is the ERROR code a server answers with (``None`` when the only sane
    reaction is to close the connection without a reply, as gearmand does for a bad
    magic or packet type). ``in_sync`` tells whether the stream is still framed
    correctly, i.e. whether an ERROR reply can still be understood by the peer.
    """

    def __init__(self, message: str, code: str | None = None, in_sync: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.in_sync = in_sync
