"""The server's TLS context, built once at start from ``--tls-cert/--tls-key/--tls-ca``.

Example::

    from gearoffload_server.tls import server_context

    context = server_context("server.pem", "server.key", ca="ca.pem", require_client_cert=True)
"""

from __future__ import annotations

from gevent import ssl


def server_context(cert: str, key: str | None = None, ca: str | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or newer, our certificate chain, and with ``ca``
    client certificates checked against it (required, or optional but verified).

    The server makes no TLS sockets from it: each ``TlsConnection`` gets an ``SSLObject``
    from ``wrap_bio`` and the poll loop does the I/O (``transport.py``); gevent's class is
    kept so that a socket wrapped with it elsewhere would still cooperate with the loop.
    Raises ``OSError``/``ssl.SSLError`` on a file that cannot be read or is not what it
    should be.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Renegotiation would let a TLS 1.2 write of a reply need the peer's answer first
    # (SSLWantReadError from SSLObject.write), which the poll loop does not wait for.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(cert, key or None)
    if ca:
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context
