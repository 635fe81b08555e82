"""TLS for clients, workers and admin connections: what ``tls=`` accepts.

``tls`` is ``None`` (plain TCP), ``True`` (TLS, server checked against the system's CA
certificates), an ``ssl.SSLContext`` of your own, or a dict of ``tls_context()``'s
arguments. The server's certificate must name the host of the server address
(``127.0.0.1`` needs an IP address entry, ``localhost`` a DNS one).

Example::

    from gearoffload import Client, tls_context

    tls = tls_context(ca="ca.pem", cert="client.pem", key="client.key")
    client = Client("jobs.internal:4730", tls=tls)
"""

from __future__ import annotations

import _ssl
import os
from collections.abc import Mapping

from gevent import socket, ssl

__all__ = ["TlsOption", "client_context", "tls_context", "tls_error_text", "tls_files",
           "tls_from_env", "wrap_client"]

#: What ``Client``, ``Worker`` and ``AdminClient`` take as ``tls``.
TlsOption = bool | ssl.SSLContext | Mapping | None


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None,
                verify: bool = True) -> ssl.SSLContext:
    """A client-side context: TLS 1.2 or newer; the server's certificate checked against
    ``ca`` (a PEM file; default: the system's CA certificates) and its host name, unless
    ``verify`` is false; ``cert``/``key`` (PEM) are our certificate for mutual TLS.

    >>> tls_context(ca="ca.pem", cert="worker.pem", key="worker.key")   # doctest: +SKIP
    <gevent.ssl.SSLContext object at ...>
    """
    if key and not cert:
        raise ValueError("a TLS key needs its certificate (cert=...)")
    for path in (ca, cert, key):  # OpenSSL's own error would not say which file
        if path:
            with open(path, "rb"):
                pass
    # gevent's context, so that its sockets cooperate with the event loop without patching.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if ca:
            context.load_verify_locations(cafile=ca)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key or None)
    return context


def client_context(tls: TlsOption) -> ssl.SSLContext | None:
    """``tls`` as given to ``Client``/``Worker``/``AdminClient``, made a context (or
    ``None`` for plain TCP). Raises ``ValueError``/``OSError`` for a bad one at once, not
    at the first connection."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return tls_context()
    if isinstance(tls, _ssl._SSLContext):  # the stdlib's too: wrap_client() makes it cooperate
        return tls
    if isinstance(tls, Mapping):
        unknown = set(tls) - {"ca", "cert", "key", "verify"}
        if unknown:
            raise ValueError(f"unknown tls option(s) {sorted(unknown)}: use ca, cert, key, "
                             "verify")
        return tls_context(**tls)
    raise TypeError(f"tls must be None, True, an ssl.SSLContext or a dict, not "
                    f"{type(tls).__name__}")


def tls_files(ca: str | None = None, cert: str | None = None,
              key: str | None = None) -> dict | None:
    """``tls=`` for the PEM files given (empty ones left out); ``None`` when none is."""
    options = {"ca": ca, "cert": cert, "key": key}
    return {name: value for name, value in options.items() if value} or None


def tls_from_env(ca: str | None = None, cert: str | None = None,
                 key: str | None = None) -> dict | None:
    """The ``tls`` of a command: its ``--tls-*`` values, else ``$GEAROFFLOAD_TLS_CA``,
    ``$GEAROFFLOAD_TLS_CERT``, ``$GEAROFFLOAD_TLS_KEY``; ``None`` when none is set."""
    env = os.environ.get
    return tls_files(ca or env("GEAROFFLOAD_TLS_CA"), cert or env("GEAROFFLOAD_TLS_CERT"),
                     key or env("GEAROFFLOAD_TLS_KEY"))


def wrap_client(context: ssl.SSLContext, sock: socket.socket, host: str) -> ssl.SSLSocket:
    """Wrap a connected gevent socket and do the handshake (bounded by the socket's
    timeout), checking that the certificate names ``host``. Always a gevent SSL socket,
    even for a context made with the stdlib's (unpatched) ``ssl`` module."""
    return ssl.SSLSocket(sock=sock, server_hostname=host,
                         do_handshake_on_connect=True, _context=context)


def tls_error_text(exc: BaseException) -> str:
    """A short, one-line reason for a TLS failure (a bad file, a refused handshake)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
