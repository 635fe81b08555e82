"""The exceptions that cross layers: one small, flat hierarchy.

Every error gearoffload raises is a ``GearmanError``; below it the hierarchy is flat, so
callers catch exactly what they mean::

    GearmanError
    ├── JobFailed           the worker failed the job (WORK_FAIL), or it was lost twice
    │   └── JobLost         accepted, then lost with its server, nowhere to resubmit it
    ├── JobException        the worker raised; ``text`` is what it sent (WORK_EXCEPTION)
    ├── JobTimeout          no answer within the timeout
    ├── NoServersAvailable  no job server could be reached
    ├── NoWorkers           no worker serves the function (``submit(require_worker=True)``)
    ├── ProtocolError       a peer sent bytes that are not valid Gearman protocol
    └── ServerError         the server answered with an ERROR packet (``code``, ``text``)

Example::

    from gearoffload import Client
    from gearoffload.errors import GearmanError, JobException, JobTimeout

    try:
        Client("127.0.0.1:4730").submit("resize", b"...").result(timeout=5)
    except JobException as exc:
        print("the worker raised:", exc.text)
    except JobTimeout:
        print("no answer within 5 s")
    except GearmanError as exc:
        print("something else went wrong:", exc)
"""

from __future__ import annotations


class GearmanError(Exception):
    """Base class of every error gearoffload raises."""


class JobFailed(GearmanError):
    """The job failed: the worker sent WORK_FAIL (or raised ``JobFailed`` itself), or the
    job was lost with its server more than once, or once with no server to resubmit it to
    (it may have run: unlike ``NoServersAvailable``, it was accepted).

    ``handle`` is the job handle when known. A task may ``raise JobFailed("why")`` to fail
    its job without exception text (the client then sees WORK_FAIL).
    """

    def __init__(self, message: str = "job failed", handle: str | None = None) -> None:
        super().__init__(message)
        self.handle = handle


class JobLost(JobFailed):
    """A job that its server accepted was lost with that server (it went away, and no
    other server could take the job again). It may have run."""


class JobException(GearmanError):
    """The worker's task raised; ``text`` is the exception text it sent (WORK_EXCEPTION)."""

    def __init__(self, text: str, handle: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.handle = handle


class JobTimeout(GearmanError):
    """No answer within the timeout (the job may still run on a worker)."""


class NoServersAvailable(GearmanError):
    """No job server could be reached (all down, or in their reconnect back-off)."""


class NoWorkers(GearmanError):
    """No worker serves ``function`` on any of the client's servers: each one's admin
    ``status`` lists no worker registration for it (``Client.workers_for`` is 0).

    Raised by ``Client.submit(..., require_worker=True)`` (and ``call``) before the job
    is submitted, so nothing is queued. ``servers`` are the servers that were asked.

    Example::

        try:
            client.call("resize", image, require_worker=True)
        except NoWorkers as exc:
            print(exc)          # no worker serves 'resize' (asked 127.0.0.1:4730)
    """

    def __init__(self, function: str, servers: list[str] | None = None) -> None:
        asked = f" (asked {', '.join(servers)})" if servers else ""
        super().__init__(f"no worker serves {function!r}{asked}")
        self.function = function
        self.servers = list(servers or [])


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


class ServerError(GearmanError):
    """The server answered a request with an ERROR packet (``code``, ``text``), e.g.
    ``QUEUE_ERROR`` / ``Job queue is full``. The connection stays usable."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}" if text else code)
        self.code = code
        self.text = text
