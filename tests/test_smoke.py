from gearoffload.protocol import PacketType as T


def test_echo_roundtrip(server):
    with server.connect() as conn:
        conn.send(T.ECHO_REQ, b"he\0llo")
        assert conn.expect(T.ECHO_RES) == (b"he\0llo",)
