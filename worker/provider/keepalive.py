"""A lean HTTP/1.1 transport for status checks: one small GET after another, kept alive.

Why not httpx's own `HTTPTransport`: a check is a few hundred bytes each way, and
httpcore's connection pool, its events and its state machine cost ~230 µs of CPU per
request here, against ~15 µs for writing the request and reading the answer straight
off a socket (the difference measured by `scripts/bench.py --check-cost`). Checks are the
workers' main CPU load while a campaign completes, so that is the time to all-final.

It stays an `httpx.BaseTransport`: requests and responses are httpx's, errors are httpx's
exceptions, and `StatusClient` uses httpx's own transport where this one does not fit (a
proxy). What it speaks: HTTP/1.1 over TCP or TLS to one origin, bodies by Content-Length,
chunked or until close; a kept-alive connection the server closed is retried once on a
fresh one (status checks are idempotent GETs), as httpcore does.

`exchange_all` keeps many checks under way from one thread, its sockets non-blocking
behind a selector: sixteen threads each blocking on one check spent ~160 µs of CPU a
check here, most of it handing the GIL and the CPU between them; one thread ~50.
"""

from __future__ import annotations

import contextlib
import select
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import httpx

# Limits on what an answer may be: a status answer is a few hundred bytes.
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_CHUNK = 65536

K = TypeVar("K")


class KeepAliveTransport(httpx.BaseTransport):
    """Requests to `origin` over at most `max_idle` idle kept-alive connections (thread-safe)."""

    def __init__(
        self,
        origin: httpx.URL,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = 16,
    ) -> None:
        if origin.scheme not in ("http", "https"):
            raise ValueError(f"KeepAliveTransport speaks http and https, not {origin.scheme!r}")
        self._scheme = origin.scheme
        self._host = origin.host
        self._port = origin.port or (443 if origin.scheme == "https" else 80)
        self._ssl = (ssl_context or httpx.create_ssl_context()) if self._scheme == "https" else None
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if (url.scheme, url.host, url.port or self._port) != (self._scheme, self._host, self._port):
            raise httpx.UnsupportedProtocol(f"this transport serves only {self._origin()}")
        try:
            reply = self.exchange(request_bytes(request), request.extensions.get("timeout", {}))
        except httpx.RequestError as exc:
            exc.request = request  # as httpx's own transports tell which request failed
            raise
        return httpx.Response(
            reply.status, headers=reply.headers, content=reply.body, request=request
        )

    def exchange(self, wire: bytes, timeouts: Mapping[str, float | None]) -> Reply:
        """Send one request already in wire form (to this transport's origin) and read its
        answer, without httpx's Request and Response objects: building those cost a status
        check more CPU than the exchange itself. Errors are httpx's, as handle_request's."""
        connection = self._take()
        if connection is not None:
            try:
                return self._exchange(connection, wire, timeouts, reused=True)
            except _StaleConnection:
                pass  # closed by the server while idle: nothing was read, try once afresh
        return self._exchange(self._open(timeouts), wire, timeouts, reused=False)

    def exchange_all(
        self,
        requests: Iterable[tuple[K, bytes]],
        timeouts: Mapping[str, float | None],
        *,
        width: int,
        deadline: float,
        go_on: Callable[[], bool] = lambda: True,
    ) -> Iterator[tuple[K, Reply | httpx.TransportError, float]]:
        """Each request (a key and its wire form) over up to `width` connections at once,
        from this one thread; yields the key, the answer (or the error `exchange` would
        raise) and the seconds it took, as answers come.

        `go_on` is asked before each request starts (False: a 429 came back, say); the ones
        under way are still answered. At `deadline` (`time.monotonic()`) none starts and
        those still unanswered end in `httpx.ReadTimeout`, their connections closed.
        """
        mux: _Multiplex[K] = _Multiplex(self, timeouts, width, deadline)
        try:
            yield from mux.run(iter(requests), go_on)
        finally:
            mux.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _origin(self) -> str:
        return f"{self._scheme}://{self._host}:{self._port}"

    def _open(self, timeouts: Mapping[str, float | None]) -> _Connection:
        return _Connection.open(self._host, self._port, self._ssl, timeouts)

    def _take(self) -> _Connection | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                connection = self._idle.pop()
            if connection.usable():
                return connection
            connection.close()

    def _give_back(self, connection: _Connection) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def _exchange(
        self,
        connection: _Connection,
        wire: bytes,
        timeouts: Mapping[str, float | None],
        *,
        reused: bool,
    ) -> Reply:
        try:
            connection.settimeout(timeouts.get("write"))
            try:
                connection.sock.sendall(wire)
            except (BrokenPipeError, ConnectionResetError):
                if reused:
                    raise _StaleConnection from None
                raise httpx.WriteError("connection closed while writing") from None
            except TimeoutError:
                raise httpx.WriteTimeout("request not written in time") from None
            connection.settimeout(timeouts.get("read"))
            status, headers, body, keep = connection.read_response(wire.startswith(b"HEAD "))
        except _StaleConnection:
            connection.close()
            if reused:
                raise
            raise httpx.RemoteProtocolError(
                "server disconnected without sending a response"
            ) from None
        except httpx.TransportError:
            connection.close()
            raise
        except TimeoutError:
            connection.close()
            raise httpx.ReadTimeout("no answer within the read timeout") from None
        except _Malformed as exc:
            connection.close()
            raise httpx.RemoteProtocolError(str(exc)) from None
        except OSError as exc:
            connection.close()
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from None
        if keep:
            self._give_back(connection)
        else:
            connection.close()
        return Reply(status, headers, body)


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer as read off the socket."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of the header `name` (lower case), if any."""
        return next((v for n, v in self.headers if n.lower() == name), None)


def request_bytes(request: httpx.Request) -> bytes:
    """The request as this transport writes it."""
    body = request.read()
    lines = [f"{request.method} ".encode() + request.url.raw_path + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _StaleConnection(Exception):
    """The server closed the connection before answering a byte."""


class _Malformed(Exception):
    """An answer that is not HTTP/1.x as this transport reads it."""


class _Incomplete(Exception):
    """More of the answer is still to come."""


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._timeout = sock.gettimeout()
        # read_buffered: parse only what has arrived (None: read the socket as needed),
        # True once the peer closed.
        self._arrived_only: bool | None = None

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        timeouts: Mapping[str, float | None],
    ) -> _Connection:
        try:
            sock = socket.create_connection((host, port), timeout=timeouts.get("connect"))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} in time") from None
        except OSError as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from None
        return cls(sock)

    def settimeout(self, seconds: float | None) -> None:
        if seconds != self._timeout:  # a system call each time, for the same value mostly
            self.sock.settimeout(seconds)
            self._timeout = seconds

    def usable(self) -> bool:
        """An idle connection with nothing to read: a readable one was closed (or spoke out
        of turn) while idle."""
        if self._buffer:
            return False
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def read_response(self, head_only: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Status, headers, body (none for a HEAD), and whether the connection may carry
        another request."""
        head = self._read_head()
        status_line, *header_lines = head.split(b"\r\n")
        version, status = _status(status_line)
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = encoded = False
        keep = version == b"HTTP/1.1"
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _Malformed(f"malformed header line {line[:60]!r}")
            value = value.strip()
            headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit():
                    raise _Malformed(f"Content-Length {value[:20]!r} is not a number")
                length = int(value)
            elif lower == b"transfer-encoding":
                encoded = True
                chunked = value.lower().endswith(b"chunked")
            elif lower == b"connection":
                options = {t.strip() for t in value.lower().split(b",")}
                keep = b"close" not in options and (keep or b"keep-alive" in options)
        if head_only or status in (204, 304) or 100 <= status < 200:
            return status, headers, b"", keep
        if chunked:
            body = b"".join(self._chunks())
            # Content-Length is meaningless beside chunked; the answer is what the chunks say.
            headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
        elif length is not None:
            if length > MAX_BODY:
                raise _Malformed(f"an answer of {length} bytes is over {MAX_BODY}")
            body = self._read_exactly(length)
        else:
            body = self._read_to_close()
            keep = False
        if encoded:
            headers = [(n, v) for n, v in headers if n.lower() != b"transfer-encoding"]
        return status, headers, body, keep

    def receive(self) -> bool:
        """Add what a non-blocking socket has to the buffer; False once the peer closed."""
        data = self.sock.recv(_CHUNK)
        self._buffer += data
        if isinstance(self.sock, ssl.SSLSocket):
            while pending := self.sock.pending():
                self._buffer += self.sock.recv(pending)
        return bool(data)

    def read_buffered(
        self, closed: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool] | None:
        """`read_response` over the bytes received so far (`closed`: no more will come);
        None while the answer is incomplete, its bytes left in the buffer."""
        received = bytes(self._buffer)
        self._arrived_only = closed
        try:
            return self.read_response(False)
        except _Incomplete:
            self._buffer[:] = received
            return None
        except _StaleConnection:
            if received:
                raise _Malformed("connection closed in the middle of the response head") from None
            raise
        finally:
            self._arrived_only = None

    def _fill(self) -> bool:
        if self._arrived_only is not None:
            if self._arrived_only:
                return False
            raise _Incomplete
        data = self.sock.recv(_CHUNK)
        self._buffer += data
        return bool(data)

    def _read_head(self) -> bytes:
        received = False
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                return head
            if len(self._buffer) > MAX_HEAD:
                raise _Malformed(f"response head over {MAX_HEAD} bytes")
            try:
                more = self._fill()
            except ConnectionResetError:
                if received:
                    raise
                raise _StaleConnection from None
            if not more:
                if received:
                    raise _Malformed("connection closed in the middle of the response head")
                raise _StaleConnection
            received = True

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not self._fill():
                raise _Malformed(f"connection closed after {len(self._buffer)} of {n} bytes")
        body = bytes(self._buffer[:n])
        del self._buffer[:n]
        return body

    def _read_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise _Malformed("chunk header line too long")
            if not self._fill():
                raise _Malformed("connection closed in the middle of a chunked body")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _chunks(self) -> Iterator[bytes]:
        total = 0
        while True:
            size_text = self._read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Malformed(f"chunk size {size_text[:20]!r} is not hexadecimal") from None
            if size == 0:
                while self._read_line():  # trailers, up to the empty line
                    pass
                return
            total += size
            if total > MAX_BODY:
                raise _Malformed(f"a chunked answer over {MAX_BODY} bytes")
            yield self._read_exactly(size)
            if self._read_exactly(2) != b"\r\n":
                raise _Malformed("chunk not followed by CRLF")

    def _read_to_close(self) -> bytes:
        while self._fill():
            if len(self._buffer) > MAX_BODY:
                raise _Malformed(f"an answer over {MAX_BODY} bytes")
        body = bytes(self._buffer)
        self._buffer.clear()
        return body


def _status(line: bytes) -> tuple[bytes, int]:
    version, _, rest = line.partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit():
        raise _Malformed(f"not an HTTP/1.x status line: {line[:60]!r}")
    return version, int(code)


class _Lane(Generic[K]):
    """One connection of `exchange_all`, and the request under way on it, if any."""

    __slots__ = ("busy", "connection", "due", "events", "key", "reused", "sent", "started", "wire")

    def __init__(self, connection: _Connection, reused: bool) -> None:
        self.connection = connection
        self.reused = reused  # it carried an earlier request: the server may have closed it
        self.events = 0
        self.busy = False
        self.key: K
        self.wire = b""
        self.sent = 0
        self.started = 0.0
        self.due = 0.0

    def begin(self, key: K, wire: bytes) -> None:
        self.busy = True
        self.key = key
        self.wire = wire
        self.sent = 0
        self.started = time.monotonic()


Answered = tuple[K, Reply | httpx.TransportError, float]


class _Multiplex(Generic[K]):
    """The loop behind `KeepAliveTransport.exchange_all`: up to `width` lanes, each a
    connection kept from one request to the next, registered with one selector."""

    def __init__(
        self,
        transport: KeepAliveTransport,
        timeouts: Mapping[str, float | None],
        width: int,
        deadline: float,
    ) -> None:
        self._transport = transport
        self._timeouts = timeouts
        self._width = max(1, width)
        self._deadline = deadline
        self._selector = selectors.DefaultSelector()
        self._lanes: set[_Lane[K]] = set()
        self._idle: list[_Lane[K]] = []
        self._again: deque[tuple[K, bytes]] = deque()  # found a stale connection: once more

    def run(
        self, requests: Iterator[tuple[K, bytes]], go_on: Callable[[], bool]
    ) -> Iterator[Answered[K]]:
        while True:
            while time.monotonic() < self._deadline:
                item = self._next(requests, go_on)
                if item is None:
                    break
                started = self._start(*item)
                if started is not None:
                    yield started
            busy = [lane for lane in self._lanes if lane.busy]
            if not busy:
                return
            wait = min(lane.due for lane in busy) - time.monotonic()
            for ready, _ in self._selector.select(max(0.0, wait)):
                done = self._advance(ready.data)
                if done is not None:
                    yield done
            now = time.monotonic()
            for lane in [lane for lane in self._lanes if lane.busy and lane.due <= now]:
                self._drop(lane)
                error = (
                    httpx.WriteTimeout("request not written in time")
                    if lane.sent < len(lane.wire)
                    else httpx.ReadTimeout("no answer within the read timeout")
                )
                yield lane.key, error, now - lane.started

    def close(self) -> None:
        for lane in list(self._lanes):
            if lane.busy:
                self._drop(lane)
            else:
                self._lanes.discard(lane)
                self._unregister(lane)
                self._transport._give_back(lane.connection)
        self._selector.close()

    def _next(
        self, requests: Iterator[tuple[K, bytes]], go_on: Callable[[], bool]
    ) -> tuple[K, bytes, bool] | None:
        """The next request to start and whether it needs a fresh connection, if a lane
        is free for it."""
        if not self._idle and len(self._lanes) >= self._width:
            return None
        if self._again:
            return *self._again.popleft(), True
        if not go_on():
            return None
        item = next(requests, None)
        return None if item is None else (*item, False)

    def _start(self, key: K, wire: bytes, fresh: bool) -> Answered[K] | None:
        lane = self._idle.pop() if self._idle and not fresh else None
        if lane is None:
            started = time.monotonic()
            try:
                lane = self._lane(fresh)
            except httpx.TransportError as exc:
                return key, exc, time.monotonic() - started
        lane.begin(key, wire)
        return self._advance(lane)  # its first write, its errors handled as any other's

    def _lane(self, fresh: bool) -> _Lane[K]:
        if len(self._lanes) >= self._width:  # a fresh connection in place of an idle one
            self._drop(self._idle.pop())
        connection = None if fresh else self._transport._take()
        reused = connection is not None
        if connection is None:
            connection = self._transport._open(self._timeouts)
        connection.settimeout(0.0)
        lane: _Lane[K] = _Lane(connection, reused)
        self._lanes.add(lane)
        return lane

    def _advance(self, lane: _Lane[K]) -> Answered[K] | None:
        if not lane.busy:  # an idle connection readable: closed by the server, or astray
            self._drop(lane)
            return None
        try:
            if lane.sent < len(lane.wire):
                self._write(lane)
                return None
            return self._read(lane)
        except _StaleConnection:
            self._drop(lane)
            if lane.reused:
                self._again.append((lane.key, lane.wire))
                return None
            error: httpx.TransportError = httpx.RemoteProtocolError(
                "server disconnected without sending a response"
            )
        except httpx.TransportError as exc:
            self._drop(lane)
            error = exc
        except _Malformed as exc:
            self._drop(lane)
            error = httpx.RemoteProtocolError(str(exc))
        except OSError as exc:
            self._drop(lane)
            error = httpx.ReadError(f"{type(exc).__name__}: {exc}")
        return lane.key, error, time.monotonic() - lane.started

    def _write(self, lane: _Lane[K]) -> None:
        try:
            lane.sent += lane.connection.sock.send(memoryview(lane.wire)[lane.sent :])
        except (BlockingIOError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLWantReadError:
            self._wait(lane, selectors.EVENT_READ, "write")
            return
        except (BrokenPipeError, ConnectionResetError):
            if lane.reused and not lane.sent:
                raise _StaleConnection from None
            raise httpx.WriteError("connection closed while writing") from None
        if lane.sent < len(lane.wire):
            self._wait(lane, selectors.EVENT_WRITE, "write")
        else:
            self._wait(lane, selectors.EVENT_READ, "read")

    def _read(self, lane: _Lane[K]) -> Answered[K] | None:
        connection = lane.connection
        try:
            closed = not connection.receive()
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except ConnectionResetError:
            closed = True
        answer = connection.read_buffered(closed)
        if answer is None:
            if closed:
                raise _Malformed("connection closed in the middle of the response")
            return None
        status, headers, body, keep = answer
        lane.busy = False
        if keep:
            lane.reused = True
            self._idle.append(lane)
        else:
            self._drop(lane)
        return lane.key, Reply(status, headers, body), time.monotonic() - lane.started

    def _wait(self, lane: _Lane[K], events: int, for_: str) -> None:
        timeout = self._timeouts.get(for_)
        until = self._deadline if timeout is None else time.monotonic() + timeout
        lane.due = min(until, self._deadline)
        if lane.events == events:
            return
        if lane.events:
            self._selector.modify(lane.connection.sock, events, lane)
        else:
            self._selector.register(lane.connection.sock, events, lane)
        lane.events = events

    def _unregister(self, lane: _Lane[K]) -> None:
        if lane.events:
            self._selector.unregister(lane.connection.sock)
            lane.events = 0

    def _drop(self, lane: _Lane[K]) -> None:
        """Close the lane's connection: after an error, or with an answer half read."""
        self._lanes.discard(lane)
        if lane in self._idle:
            self._idle.remove(lane)
        self._unregister(lane)
        lane.busy = False
        lane.connection.close()
