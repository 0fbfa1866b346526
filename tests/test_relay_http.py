"""The relay's HTTP/1.1 front (turbowg/relay/http.py) over a real loopback socket: 431 for an oversized request
head (split over reads or in one), 405 for other methods (connection kept or closed as the request allows),
HEAD (headers with the body's length, no body), keep-alive (sequential and pipelined requests on one
connection) and its ends (Connection: close, HTTP/1.0, bad requests)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from turbowg.derp import codec, keys
from turbowg.relay import http
from turbowg.relay.http import MAX_REQUEST_HEAD, RelayHTTPProtocol
from turbowg.relay.server import DerpServer

TIMEOUT = 5.0


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    """One response: status line, headers, then exactly Content-Length body bytes (none for HEAD/204)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head or int(status) == 204 else int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT) if length else b""
    return Response(int(status), headers, body)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True if the server closed the connection (EOF with nothing more); False if it stays open (no EOF
    within a short bound). Any extra bytes are a failure: nothing may follow the last response."""
    try:
        rest = await asyncio.wait_for(reader.read(1), 1.0)
    except TimeoutError:
        return False
    assert rest == b"", f"unexpected bytes after the response: {rest!r}"
    return True


def run(scenario: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        server = DerpServer(keys.generate_private_key())
        listener = await asyncio.get_running_loop().create_server(
            lambda: RelayHTTPProtocol(server), "127.0.0.1", 0, family=socket.AF_INET)
        try:
            await scenario(listener.sockets[0].getsockname()[1])
        finally:
            listener.close()
            await listener.wait_closed()

    asyncio.run(main())


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def request(method: str, path: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    return (f"{method} {path} {version}\r\nHost: relay\r\n" + "".join(h + "\r\n" for h in headers)
            + "\r\n").encode()


# ---------------------------------------------------------------------------------------------------------
# 431


@pytest.mark.parametrize("one_write", [False, True])
def test_oversized_request_head_gets_431_and_close(one_write: bool) -> None:
    """More than MAX_REQUEST_HEAD bytes of request head: 431, Connection: close, then EOF. Whether the blank
    line comes in the same read or never (headers trickling in) must not matter."""
    filler = "".join(f"X-Filler-{i}: {'a' * 100}\r\n" for i in range(MAX_REQUEST_HEAD // 100 + 10))

    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        if one_write:
            writer.write(f"GET / HTTP/1.1\r\nHost: relay\r\n{filler}\r\n".encode())
        else:
            writer.write(b"GET / HTTP/1.1\r\nHost: relay\r\n")
            data = filler.encode()
            for i in range(0, len(data), 4096):
                writer.write(data[i:i + 4096])
                await writer.drain()
        resp = await read_response(reader)
        assert resp.status == 431 and resp.headers["connection"] == "close"
        assert resp.body == b"request header too large\n"
        assert await closed_by_server(reader)
        writer.close()

    run(scenario)


def test_request_head_just_under_the_limit_is_served() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        base = len(request("GET", "/robots.txt")) - 2
        pad = MAX_REQUEST_HEAD - base - len("X-Pad: \r\n") - 64
        writer.write(request("GET", "/robots.txt", "X-Pad: " + "p" * pad))
        resp = await read_response(reader)
        assert resp.status == 200 and resp.body == b"User-agent: *\nDisallow: /\n"
        assert "connection" not in resp.headers
        writer.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------------------
# 405


def test_other_methods_get_405_and_the_connection_stays_when_there_is_no_body() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            writer.write(request(method, "/"))
            resp = await read_response(reader)
            assert resp.status == 405 and resp.body == b"method not allowed\n", method
            assert "connection" not in resp.headers
        writer.write(request("GET", "/robots.txt"))  # the same connection still serves
        assert (await read_response(reader)).status == 200
        writer.close()

    run(scenario)


@pytest.mark.parametrize("body_header", ["Content-Length: 5", "Transfer-Encoding: chunked"])
def test_405_with_a_request_body_closes(body_header: str) -> None:
    """The relay never reads request bodies, so it must not parse one as the next request: close instead."""
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        body = b"hello" if body_header.startswith("Content") else b"5\r\nhello\r\n0\r\n\r\n"
        writer.write(request("POST", "/metrics", body_header) + body)
        resp = await read_response(reader)
        assert resp.status == 405 and resp.headers["connection"] == "close"
        assert await closed_by_server(reader)
        writer.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------------------
# HEAD


@pytest.mark.parametrize("path,status", [("/", 200), ("/robots.txt", 200), ("/metrics", 200),
                                         ("/derp/probe", 200), ("/no-such-page", 404)])
def test_head_sends_the_headers_of_get_without_the_body(path: str, status: int) -> None:
    """HEAD then GET pipelined on one connection: HEAD's Content-Length is GET's body length and no body
    bytes follow it (else the GET's status line would not come next)."""
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        writer.write(request("HEAD", path) + request("GET", path))
        head = await read_response(reader, head=True)
        got = await read_response(reader)
        assert head.status == got.status == status
        if path != "/metrics":  # the metrics text changes between the two requests (request counters)
            assert int(head.headers["content-length"]) == len(got.body)
            assert head.headers == got.headers
        assert head.body == b""
        assert not await closed_by_server(reader)
        writer.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------------------
# keep-alive


def test_keep_alive_serves_sequential_and_pipelined_requests_in_order() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        for _ in range(3):
            writer.write(request("GET", "/derp/probe"))
            resp = await read_response(reader)
            assert resp.status == 200 and resp.headers["access-control-allow-origin"] == "*"
        writer.write(request("GET", "/robots.txt") + request("GET", "/nope")
                     + request("GET", "/generate_204", "X-Tailscale-Challenge: abc-1") + request("GET", "/"))
        statuses = []
        for _ in range(4):
            resp = await read_response(reader)
            statuses.append(resp.status)
            if resp.status == 204:
                assert resp.headers["x-tailscale-response"] == "response abc-1"
        assert statuses == [200, 404, 204, 200]
        assert not await closed_by_server(reader)
        writer.close()

    run(scenario)


def test_a_request_split_across_writes_is_one_request() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        data = request("GET", "/robots.txt")
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
        assert (await read_response(reader)).status == 200
        writer.close()

    run(scenario)


@pytest.mark.parametrize("how", ["connection-close", "http-1.0"])
def test_connection_close_and_http_1_0_end_after_the_response(how: str) -> None:
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        if how == "connection-close":
            writer.write(request("GET", "/robots.txt", "Connection: close") + request("GET", "/"))
        else:
            writer.write(request("GET", "/robots.txt", version="HTTP/1.0") + request("GET", "/"))
        resp = await read_response(reader)
        assert resp.status == 200 and resp.headers["connection"] == "close"
        assert await closed_by_server(reader)  # the pipelined second request is not answered
        writer.close()

    run(scenario)


@pytest.mark.parametrize("bad", [b"GARBAGE\r\n\r\n", b"GET / SPDY/3\r\n\r\n", b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"])
def test_a_bad_request_gets_400_and_close(bad: bytes) -> None:
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        writer.write(bad)
        resp = await read_response(reader)
        assert resp.status == 400 and resp.headers["connection"] == "close"
        assert await closed_by_server(reader)
        writer.close()

    run(scenario)


def test_derp_without_upgrade_gets_426_and_close() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        writer.write(request("GET", "/derp"))
        resp = await read_response(reader)
        assert resp.status == 426 and resp.headers["connection"] == "close"
        assert await closed_by_server(reader)
        writer.close()

    run(scenario)


def test_an_idle_connection_is_dropped_after_the_header_timeout(monkeypatch) -> None:
    monkeypatch.setattr(http, "HEADER_TIMEOUT", 0.2)

    async def scenario(port: int) -> None:
        reader, writer = await connect(port)
        writer.write(b"GET / HTTP/1.1\r\n")  # never finished
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()

    run(scenario)


# ---------------------------------------------------------------------------------------------------------
# derper's derp_average_queue_duration_ms


def test_average_queue_duration_tracks_packets_waiting_for_a_paused_writer() -> None:
    """Packets held while the receiver's socket is full count their wait in the EWMA derper exports."""
    from test_relay_server import Peer

    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0)
        a, b = Peer(s, 1), Peer(s, 2)
        b.conn.pause_writing()  # b's socket is over its high-water mark
        for i in range(3):
            a.feed(codec.encode_send_packet(b.key, bytes([i]) * 100))
        await asyncio.sleep(0.2)
        b.conn.resume_writing()
        assert len(b.packets()) == 3
        avg = s.metrics.avg_queue_duration_ms
        assert 200 * (1 - 0.9 ** 3) * 0.9 < avg < 400, avg  # one batch of 3, ~200 ms old
        text = s.render_metrics().decode()
        line = next(ln for ln in text.splitlines() if ln.startswith("derp_average_queue_duration_ms "))
        assert abs(float(line.split()[1]) - avg) < 1e-6
        a.feed(codec.encode_send_packet(b.key, b"fresh"))  # written at once: the average decays
        s.flush_dirty()
        assert s.metrics.avg_queue_duration_ms < avg

    asyncio.run(main())
