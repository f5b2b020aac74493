"""The status checks' lean transport against scripted servers over real sockets."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from config import Settings
from tests.helpers import STATUS, Closing, Pieces, Reset, Script, Server, ok
from worker.provider.keepalive import KeepAliveTransport
from worker.provider.smsbat import (
    NotFound,
    ProviderError,
    StatusClient,
    StatusReport,
    Throttled,
    Unavailable,
)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(script: Script, context: ssl.SSLContext | None = None) -> Server:
        servers.append(Server(script, context))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client_for(server: Server, scheme: str = "http", **settings: object) -> StatusClient:
    values = {
        "SMSBAT_BASE_URL": f"{scheme}://127.0.0.1:{server.port}",
        "SMSBAT_API_KEY": "k-secret",
        "HTTP_READ_TIMEOUT_SECONDS": 0.5,
    } | settings
    return StatusClient(Settings(**values))  # type: ignore[arg-type]


def test_a_check_is_one_get_with_the_key_and_the_connection_is_kept(
    serve: Callable[..., Server],
) -> None:
    server = serve(lambda n, head: ok())
    client = client_for(server)
    for _ in range(5):
        assert client.status("m-1").state == "delivered"
    assert server.connections == 1
    head = server.requests[0].decode()
    assert head.startswith("GET /bat/message/m-1 HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{server.port}" in head.lower()
    assert "x-authorization-key: k-secret" in head.lower()


def test_the_id_is_quoted_into_the_request_under_the_base_path(
    serve: Callable[..., Server],
) -> None:
    """The request's bytes are made once with a hole for the id: an id that needs quoting and
    a base URL with a path of its own come out as httpx would write them."""
    server = serve(lambda n, head: ok())
    client = client_for(server, SMSBAT_BASE_URL=f"http://127.0.0.1:{server.port}/v2")
    client.status("a/b c?")
    client.status("m-2")
    heads = [request.decode() for request in server.requests]
    assert heads[0].startswith("GET /v2/bat/message/a%2Fb%20c%3F HTTP/1.1\r\n")
    assert heads[1].startswith("GET /v2/bat/message/m-2 HTTP/1.1\r\n")
    assert heads[0].split("\r\n", 1)[1] == heads[1].split("\r\n", 1)[1]


def test_bodies_by_chunks_and_until_close_are_read_whole(serve: Callable[..., Server]) -> None:
    half = len(STATUS) // 2
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x;ext=1\r\n%s\r\n" % (half, STATUS[:half])
        + b"%x\r\n%s\r\n" % (len(STATUS) - half, STATUS[half:])
        + b"0\r\nX-Trailer: t\r\n\r\n"
    )
    server = serve(lambda n, head: chunked)
    client = client_for(server)
    assert client.status("m-1").state == "delivered"
    assert client.status("m-1").state == "delivered"
    assert server.connections == 1  # a chunked answer leaves the connection usable

    closing = serve(lambda n, head: Closing(b"HTTP/1.0 200 OK\r\n\r\n" + STATUS))
    client = client_for(closing)
    assert client.status("m-1").state == "delivered"
    assert client.status("m-1").state == "delivered"
    assert closing.connections == 2  # read until close: never reused


def test_a_connection_closed_while_idle_is_replaced_once(serve: Callable[..., Server]) -> None:
    # The server answers one request per connection, then closes without saying so.
    server = serve(lambda n, head: ok() if n == 0 else None)
    client = client_for(server)
    for _ in range(4):
        assert client.status("m-1").state == "delivered"
    assert server.connections == 4


def test_a_fresh_connection_that_closes_unanswered_is_an_outage(
    serve: Callable[..., Server],
) -> None:
    server = serve(lambda n, head: None)
    with pytest.raises(Unavailable, match="RemoteProtocolError"):
        client_for(server).status("m-1")


def test_connection_close_is_honoured(serve: Callable[..., Server]) -> None:
    server = serve(lambda n, head: ok(STATUS, b"Connection: close"))
    client = client_for(server)
    assert client.status("m-1").state == "delivered"
    assert client.status("m-1").state == "delivered"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n", Throttled),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}", NotFound),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", Unavailable),
        (b"SMTP ready\r\n\r\n", Unavailable),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", Unavailable),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", Unavailable),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", Unavailable),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!", Unavailable),
    ],
)
def test_answers_map_to_the_clients_errors(
    serve: Callable[..., Server], answer: bytes, error: type[Exception]
) -> None:
    server = serve(lambda n, head: answer)
    with pytest.raises(error) as caught:
        client_for(server).status("m-1")
    if isinstance(caught.value, Throttled):
        assert caught.value.retry_after == 7


def test_a_short_body_then_close_is_a_protocol_error(serve: Callable[..., Server]) -> None:
    server = serve(lambda n, head: Closing(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{}"))
    with pytest.raises(Unavailable, match="RemoteProtocolError"):
        client_for(server).status("m-1")


def test_a_silent_server_times_out_on_read(serve: Callable[..., Server]) -> None:
    server = serve(lambda n, head: "hang")
    with pytest.raises(Unavailable, match="ReadTimeout"):
        client_for(server).status("m-1")


def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(SMSBAT_BASE_URL=f"http://127.0.0.1:{port}", SMSBAT_API_KEY="k")  # type: ignore[call-arg]
    with pytest.raises(Unavailable, match="ConnectError"):
        StatusClient(settings).status("m-1")


def test_other_origins_are_refused() -> None:
    transport = KeepAliveTransport(httpx.URL("http://127.0.0.1:9"))
    with pytest.raises(httpx.UnsupportedProtocol):
        transport.handle_request(httpx.Request("GET", "http://example.invalid/x"))
    with pytest.raises(ValueError, match="ftp"):
        KeepAliveTransport(httpx.URL("ftp://127.0.0.1/"))


def test_a_proxy_in_the_environment_gets_httpx_own_transport(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Server]
) -> None:
    server = serve(lambda n, head: ok())
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = client_for(server, SMSBAT_BASE_URL="http://provider.invalid")
    assert client.status("m-1").state == "delivered"
    assert server.requests[0].startswith(b"GET http://provider.invalid/bat/message/m-1 HTTP/1.1")


def test_threads_share_the_pool(serve: Callable[..., Server]) -> None:
    server = serve(lambda n, head: ok())
    client = client_for(server, POLL_CONCURRENCY=4)
    results: list[str] = []

    def work() -> None:
        for _ in range(50):
            results.append(client.status("m-1").state)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["delivered"] * 400
    assert server.connections <= 8 + 50  # idle connections kept: at most 4 beyond the busy


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


def test_tls_with_the_servers_certificate_trusted(
    serve: Callable[..., Server], certificate: tuple[Path, Path]
) -> None:
    key, cert = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    server = serve(lambda n, head: ok(), server_context)
    trusted = ssl.create_default_context(cafile=str(cert))
    origin = httpx.URL(f"https://127.0.0.1:{server.port}")
    status = StatusClient(
        Settings(SMSBAT_BASE_URL=str(origin), SMSBAT_API_KEY="k"),  # type: ignore[call-arg]
        transport=KeepAliveTransport(origin, ssl_context=trusted),
    )
    for _ in range(3):
        assert status.status("m-1").state == "delivered"
    assert server.connections == 1
    # Not trusted (the system's roots): refused, as httpx's transport would.
    with pytest.raises(Unavailable, match="ConnectError"):
        client_for(server, "https").status("m-1")


# --- many checks at once from one thread (`status_all` over `exchange_all`) ---------------


def check_many(
    client: StatusClient,
    ids: Sequence[str],
    *,
    width: int = 4,
    budget: float = 10,
    go_on: Callable[[], bool] = lambda: True,
) -> dict[str, StatusReport | ProviderError]:
    """Every answer `status_all` yields, by id; each id at most once."""
    answers: dict[str, StatusReport | ProviderError] = {}
    with ThreadPoolExecutor(width) as threads:
        for message_id, answer, seconds in client.status_all(
            ids, width=width, deadline=time.monotonic() + budget, go_on=go_on, threads=threads
        ):
            assert message_id not in answers and seconds >= 0
            answers[message_id] = answer
    return answers


def states(answers: dict[str, StatusReport | ProviderError]) -> dict[str, str]:
    return {
        m: a.state if isinstance(a, StatusReport) else type(a).__name__ for m, a in answers.items()
    }


IDS = [f"m-{i}" for i in range(40)]


def test_checks_run_width_at_a_time_over_kept_connections(serve: Callable[..., Server]) -> None:
    """The first four requests meet at a barrier in the server: made one after another, the
    barrier would break and the server close unanswered."""
    barrier = threading.Barrier(4, timeout=5)

    def script(n: int, head: bytes) -> bytes | None:
        if len(server.requests) <= 4:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return None
        return ok()

    server = serve(script)
    answers = check_many(client_for(server), IDS, width=4)
    assert states(answers) == dict.fromkeys(IDS, "delivered")
    assert server.connections == 4
    paths = sorted(r.split(b" ")[1].decode() for r in server.requests)
    assert paths == sorted(f"/bat/message/{m}" for m in IDS)


def test_answers_in_pieces_and_in_chunks_are_read_whole(serve: Callable[..., Server]) -> None:
    answer = ok()
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(STATUS), STATUS)
    )
    server = serve(
        lambda n, head: (
            Pieces((answer[:10], answer[10:60], answer[60:]))
            if b"m-1" in head
            else Pieces((chunked[:50], chunked[50:]))
        )
    )
    answers = check_many(client_for(server), IDS[:12], width=3)
    assert states(answers) == dict.fromkeys(IDS[:12], "delivered")
    assert server.connections == 3


@pytest.mark.parametrize(
    ("script", "n"),
    [
        # One answer per connection, then the server closes on the next request unanswered.
        (lambda n, head: ok() if n == 0 else None, 10),
        # A reset (RST, not FIN) right after the first answer: the next check on that
        # connection meets it on writing or on reading.
        (lambda n, head: Reset(ok()), 12),
    ],
    ids=["closed unanswered", "reset after an answer"],
)
def test_a_kept_connection_the_server_dropped_is_replaced_for_the_next_check(
    serve: Callable[..., Server], script: Script, n: int
) -> None:
    server = serve(script)
    answers = check_many(client_for(server), IDS[:n], width=2)
    assert states(answers) == dict.fromkeys(IDS[:n], "delivered")
    assert server.connections == n


def test_one_silent_or_garbled_check_holds_back_no_other(serve: Callable[..., Server]) -> None:
    def script(n: int, head: bytes) -> bytes | str:
        if b"/m-3 " in head:
            return "hang"
        if b"/m-5 " in head:
            return b"SMTP ready\r\n\r\n"
        return ok()

    server = serve(script)
    answers = check_many(client_for(server), IDS[:10], width=2)
    assert states(answers) == dict.fromkeys(IDS[:10], "delivered") | {
        "m-3": "Unavailable",
        "m-5": "Unavailable",
    }
    assert "ReadTimeout" in str(answers["m-3"]) and "RemoteProtocolError" in str(answers["m-5"])


def test_the_deadline_ends_the_checks_under_way_and_starts_no_more(
    serve: Callable[..., Server],
) -> None:
    server = serve(lambda n, head: "hang")
    client = client_for(server, HTTP_READ_TIMEOUT_SECONDS=30)
    answers = check_many(client, IDS, width=3, budget=0.3)
    assert states(answers) == dict.fromkeys(IDS[:3], "Unavailable")
    assert len(server.requests) == 3


def test_go_on_stops_new_checks_not_those_under_way(serve: Callable[..., Server]) -> None:
    server = serve(lambda n, head: ok())
    seen: list[str] = []
    with ThreadPoolExecutor(1) as threads:
        for message_id, _, _ in client_for(server).status_all(
            IDS, width=3, deadline=time.monotonic() + 10, go_on=lambda: not seen, threads=threads
        ):
            seen.append(message_id)
    assert 1 <= len(seen) <= 3 and len(server.requests) == len(seen)


def test_nothing_listening_answers_each_check_started_as_an_outage() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(SMSBAT_BASE_URL=f"http://127.0.0.1:{port}", SMSBAT_API_KEY="k")  # type: ignore[call-arg]
    answers = check_many(StatusClient(settings), IDS[:5])
    assert states(answers) == dict.fromkeys(IDS[:5], "Unavailable")
    assert all("ConnectError" in str(a) for a in answers.values())


def test_many_checks_over_tls(serve: Callable[..., Server], certificate: tuple[Path, Path]) -> None:
    key, cert = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    server = serve(
        lambda n, head: ok() if n % 2 else Pieces((ok()[:30], ok()[30:])), server_context
    )
    origin = httpx.URL(f"https://127.0.0.1:{server.port}")
    client = StatusClient(
        Settings(SMSBAT_BASE_URL=str(origin), SMSBAT_API_KEY="k"),  # type: ignore[call-arg]
        transport=KeepAliveTransport(
            origin, ssl_context=ssl.create_default_context(cafile=str(cert))
        ),
    )
    answers = check_many(client, IDS, width=4)
    assert states(answers) == dict.fromkeys(IDS, "delivered")
    assert server.connections == 4


def test_through_a_proxy_threads_make_the_checks(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., Server]
) -> None:
    server = serve(lambda n, head: ok())
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = client_for(server, SMSBAT_BASE_URL="http://provider.invalid")
    answers = check_many(client, IDS[:9], width=3)
    assert states(answers) == dict.fromkeys(IDS[:9], "delivered")
    assert all(r.startswith(b"GET http://provider.invalid/") for r in server.requests)
