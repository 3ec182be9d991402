"""A loopback TCP proxy that delays every byte by a fixed one-way time in each direction: a WAN
link without a bandwidth cap, for tests and for the benchmark's "over a WAN" section.

Why: on a WAN each DICOM request waits a round trip for its response (every C-STORE of a C-MOVE
does), so one association moves ~16 MB/s at 20 ms RTT whatever the bandwidth. Loopback hides that
entirely; this proxy puts it back, with real sockets, between a client and Orthanc, and between
Orthanc and a C-MOVE destination::

    with DelayProxy(("127.0.0.1", pacs_port), delay_s=0.010) as proxy:
        retrieve(..., port=proxy.port)     # 20 ms round trip to the PACS
        proxy.stats()["peak_active"]       # most connections open at once

Design notes (the reasons behind the less obvious choices):

* **Pipelined delay**, like netem's ``delay``: every chunk read is stamped with its arrival time
  and written once ``arrival + delay`` is reached. Chunks wait in a per-direction delay line
  (a FIFO, so order is kept) behind each other, not after each other: the delay is added once
  per byte, never once per chunk, and throughput is not capped. A line holds up to
  ``bandwidth x delay`` bytes (5 MB at 500 MB/s and 10 ms); reading stops above ``LINE_LIMIT``
  or while the receiving socket's buffer is full, as a TCP window would.
* **The handshake's round trip**: the client's ``connect()`` returns at once (the proxy accepts
  on loopback), where on a WAN it takes one round trip. With ``handshake=True`` (the default)
  the client's bytes are therefore not delivered before ``accepted + 3 x delay``: a client that
  sends as soon as it is connected gets its first answer ``4 x delay`` after ``connect()``, as
  over a real link (SYN, SYN-ACK, then the request and its answer). Client-first protocols only
  (DICOM, HTTP): a server's unsolicited greeting would arrive early.
* **Timers with microsecond resolution**: one asyncio loop in its own thread, on a ``select()``
  selector. epoll's timeout is rounded up to whole milliseconds, which would add up to 1 ms per
  hop; ``select()`` takes microseconds (plus the kernel's ~50 us timer slack).
* **Nothing is delivered early**: a timer that fires before its chunk is due is re-armed, so a
  round trip through the proxy is never shorter than ``2 x delay`` (tests rely on that).
* **FIN and RST travel the line** behind the data sent before them: a half-close is passed on
  with ``shutdown(SHUT_WR)`` once that data is written; a peer's reset (ECONNRESET) is passed on
  as an RST (``SO_LINGER {on, 0}``) and counted in ``resets``.
* ``TCP_NODELAY`` on every socket, both sides: the proxy must not add Nagle's delays.
* Only literal loopback addresses, for both ends (as :class:`~dicom_assets_tests.flaky_proxy.FlakyProxy`).

Counters (``stats()``): ``connections`` accepted, ``active`` open now, ``peak_active`` most open at
once, ``bytes_up``/``bytes_down`` delivered to the target / the client, ``resets`` connections
ended by a reset from either end, ``upstream_failures`` connects to the target that failed.
``intervals()`` gives every connection's (opened, ended) wall-clock times, so a benchmark can
count the peak within one phase (:func:`peak_overlap`).
"""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from types import TracebackType
from typing import Callable, Iterable, Sequence

from dicom_assets_tests.flaky_proxy import loopback_family

#: Bytes held in one direction's delay line before reading from its source stops (a TCP window).
LINE_LIMIT = 64 * 1024 * 1024
#: A socket's write buffer above this pauses reading from the other side (asyncio's high-water mark).
WRITE_HIGH_WATER = 4 * 1024 * 1024
#: Bytes per ``recv()`` (asyncio's default is 256 KiB): fewer loop turns at hundreds of MB/s.
READ_BYTES = 1024 * 1024
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0

_RST_LINGER = struct.pack("ii", 1, 0)
_EOF = "eof"
_RESET = "reset"


class _Side(asyncio.Protocol):
    """One socket of a proxied connection (the client's, or ours to the target)."""

    def __init__(self, conn: _Connection, is_client: bool) -> None:
        self.conn = conn
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._holds: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if hasattr(transport, "max_size"):
            transport.max_size = READ_BYTES  # type: ignore[attr-defined]
        self.conn.side_ready(self)

    def data_received(self, data: bytes) -> None:
        self.conn.line_from(self).push(data)

    def eof_received(self) -> bool:
        self.conn.proxy._ended(self.conn)
        self.conn.line_from(self).push(_EOF)
        return True  # keep the transport open for writing: the half-close travels the line first

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.side_lost(self, exc)

    # Backpressure: the line into this socket is full -> stop reading from the other side.
    def pause_writing(self) -> None:
        self.conn.other(self).hold("buffer", True)

    def resume_writing(self) -> None:
        self.conn.other(self).hold("buffer", False)

    def hold(self, reason: str, on: bool) -> None:
        """Stop (or resume) reading from this socket; reading goes on once no reason is left."""
        before = bool(self._holds)
        if on:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        if self.transport is None or self.lost or before == bool(self._holds):
            return
        if self._holds:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER {on, 0}), dropping unsent data, as a dead link would."""
        if self.transport is None or self.lost:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
        except OSError:
            pass
        self.transport.abort()


class _Line:
    """One direction of a connection: a FIFO of (due time, chunk | EOF | RESET)."""

    def __init__(self, conn: _Connection, src: _Side, dst: _Side, not_before: float) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.not_before = not_before
        self.queue: deque[tuple[float, bytes | str]] = deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.done = False  # EOF or RESET delivered, or the destination is gone

    def push(self, item: bytes | str) -> None:
        if self.done:
            return
        loop = self.conn.proxy.loop
        due = max(loop.time() + self.conn.proxy.delay_s, self.not_before)
        self.queue.append((due, item))
        if isinstance(item, bytes):
            self.queued_bytes += len(item)
            if self.queued_bytes > LINE_LIMIT:
                self.src.hold("line", True)
        if self.timer is None:
            self.arm()

    def arm(self) -> None:
        if self.queue and self.timer is None and not self.done:
            self.timer = self.conn.proxy.loop.call_at(self.queue[0][0], self.fire)

    def fire(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.dst.transport is None:
            return  # the target is not connected yet: side_ready() arms the line again
        loop = self.conn.proxy.loop
        now = loop.time()
        delivered = 0
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if item is _EOF:
                self.done = True
                if not self.dst.lost and self.dst.transport.can_write_eof():
                    self.dst.transport.write_eof()
                self.conn.eof_delivered()
                break
            if item is _RESET:
                self.done = True
                self.conn.reset_delivered(self)
                break
            assert isinstance(item, bytes)
            if not self.dst.lost:
                self.dst.transport.write(item)
                delivered += len(item)
            self.queued_bytes -= len(item)
        if delivered:
            self.conn.proxy._count("bytes_down" if self.dst.is_client else "bytes_up", delivered)
        if self.queued_bytes <= LINE_LIMIT // 2:
            self.src.hold("line", False)
        self.arm()  # the next chunk, if any (also re-arms a timer that fired early)

    def drop(self) -> None:
        """The destination is gone: forget what is queued for it."""
        self.done = True
        self.queue.clear()
        self.queued_bytes = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Connection:
    """A client connection, the proxy's connection to the target, and the two delay lines."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, is_client=True)
        self.upstream = _Side(self, is_client=False)
        hold_until = proxy.loop.time() + 3 * proxy.delay_s if proxy.handshake else 0.0
        self.up = _Line(self, self.client, self.upstream, hold_until)
        self.down = _Line(self, self.upstream, self.client, 0.0)
        self.eofs = 0
        self.closed = False
        self.was_reset = False
        self.index = -1  # into proxy._intervals

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def line_from(self, side: _Side) -> _Line:
        return self.up if side is self.client else self.down

    def side_ready(self, side: _Side) -> None:
        if side is self.client:
            self.proxy._opened(self)
            self.proxy.loop.create_task(self._connect_upstream())
        else:
            self.up.arm()  # what the client sent meanwhile, once it is due

    async def _connect_upstream(self) -> None:
        try:
            await self.proxy.loop.create_connection(lambda: self.upstream, *self.proxy.target)
        except OSError:
            self.proxy._count("upstream_failures", 1)
            self.upstream.lost = True
            self.up.drop()
            self.client.reset()  # the client had been accepted: it sees a reset, as from a dead link
            self._finish()
            return
        if self.closed:  # stopped meanwhile
            self.upstream.reset()

    def eof_delivered(self) -> None:
        self.eofs += 1
        if self.eofs == 2:  # both half-closes passed on: close both once their buffers are written
            for side in (self.client, self.upstream):
                if side.transport is not None and not side.lost:
                    side.transport.close()
            self._finish()

    def reset_delivered(self, line: _Line) -> None:
        line.dst.reset()
        self._finish()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        """A socket closed: by us (after both FINs or an RST), or by its peer with an error."""
        self.line_from(self.other(side)).drop()  # nothing more can be written to it
        if self.closed:
            return
        if exc is not None:  # the peer reset (or the socket failed): pass a reset on, in order
            self.was_reset = True
            self.proxy._ended(self)
            line = self.line_from(side)
            if line.done:  # its FIN went already: nothing can travel behind it
                self.other(side).reset()
                self._finish()
            else:
                line.push(_RESET)  # delivered after the data before it (once the target is connected)
        elif self.other(side).lost:
            self._finish()

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            side.reset()
        self.up.drop()
        self.down.drop()
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy._closed(self)


class DelayProxy:
    """Loopback TCP proxy adding ``delay_s`` one way in each direction (pipelined, order kept,
    no bandwidth cap). ``target``: the (loopback host, port) to forward to; ``port``: 0 picks a
    free loopback port. ``handshake``: model the TCP handshake's round trip (see the module)."""

    def __init__(
        self,
        target: tuple[str, int],
        delay_s: float,
        *,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        handshake: bool = True,
        name: str = "",
    ) -> None:
        loopback_family(target[0])
        loopback_family(listen_host)
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        self.target = (target[0], int(target[1]))
        self.delay_s = float(delay_s)
        self.listen_host = listen_host
        self.port = int(port)
        self.handshake = handshake
        self.name = name or f"delay-proxy->{self.target[1]}"
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(("connections", "active", "peak_active", "bytes_up", "bytes_down",
                                        "resets", "upstream_failures"), 0)  # fmt: skip
        self._intervals: list[list[float | None]] = []
        self._connections: set[_Connection] = set()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # made by start()

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> DelayProxy:
        """Listen, then forward in a thread of its own; a bind failure raises here."""
        if self._thread is not None:
            raise RuntimeError("a DelayProxy can only be started once")
        self.loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self.loop)
        try:
            future.result(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the port, reset every connection still open, and stop the thread. Safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None or not thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        try:
            future.result(STOP_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"DelayProxy thread {thread.name} did not stop within {STOP_TIMEOUT_S} s")
        self.loop.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.listen_host, self.port

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the counters (see the module)."""
        with self._lock:
            return dict(self._counters)

    def intervals(self) -> list[tuple[float, float | None]]:
        """Every connection's (opened, ended) ``time.time()``: accepted, and the first FIN or reset
        from either end reached the proxy (else closed); None while neither happened. Why not the
        close: a released association's FIN still travels the delay line while the next one opens,
        which would count two associations where one was in use."""
        with self._lock:
            return [(float(a), b) for a, b in self._intervals]  # type: ignore[arg-type]

    def describe(self) -> str:
        counters = " ".join(f"{k}={v}" for k, v in self.stats().items())
        return f"DelayProxy {self.listen_host}:{self.port} -> {self.target[0]}:{self.target[1]} +{self.delay_s * 1000:g} ms each way {counters}"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    # ------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _listen(self) -> None:
        self._server = await self.loop.create_server(
            self._accept, self.listen_host, self.port, reuse_address=True, backlog=128
        )  # fmt: skip
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self) -> _Side:
        conn = _Connection(self)
        self._connections.add(conn)
        return conn.client

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        for task in asyncio.all_tasks(self.loop):
            if task is not asyncio.current_task():
                task.cancel()  # connects to the target still under way
        await asyncio.sleep(0)  # let the aborted transports call connection_lost

    def _opened(self, conn: _Connection) -> None:
        with self._lock:
            c = self._counters
            c["connections"] += 1
            c["active"] += 1
            c["peak_active"] = max(c["peak_active"], c["active"])
            conn.index = len(self._intervals)
            self._intervals.append([time.time(), None])

    def _closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if conn.index < 0:
            return  # never opened (the client vanished before connection_made)
        with self._lock:
            self._counters["active"] -= 1
            if conn.was_reset:
                self._counters["resets"] += 1
            if self._intervals[conn.index][1] is None:
                self._intervals[conn.index][1] = time.time()

    def _ended(self, conn: _Connection) -> None:
        """One end said it is done (its FIN or reset reached the proxy): the connection's use ends here."""
        if conn.index < 0:
            return
        with self._lock:
            if self._intervals[conn.index][1] is None:
                self._intervals[conn.index][1] = time.time()

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self._counters[name] += n


def peak_overlap(intervals: Iterable[tuple[float, float | None]], start: float = float("-inf"), end: float = float("inf")) -> int:
    """Most intervals open at the same instant within ``[start, end]`` (an open one counts to ``end``)."""
    events: list[tuple[float, int]] = []
    for opened, closed in intervals:
        a, b = max(opened, start), min(closed if closed is not None else float("inf"), end)
        if a < b:
            events += [(a, 1), (b, -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # a close and an open at the same instant do not overlap
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


# -- measuring the proxy itself -------------------------------------------------------------------


class LoopbackServer:
    """A loopback server running ``serve(sock)`` for each connection in a thread of its own."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._serve = serve
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = ("127.0.0.1", self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name="delay-proxy-peer", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_one, args=(sock,), daemon=True).start()

    def _serve_one(self, sock: socket.socket) -> None:
        with sock:
            try:
                self._serve(sock)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()


def echo(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def sink(sock: socket.socket) -> None:
    """Read everything, then answer with the byte count (8 bytes) once the sender half-closes."""
    total = 0
    buffer = bytearray(READ_BYTES)
    while n := sock.recv_into(buffer):
        total += n
    sock.sendall(struct.pack("!Q", total))


def connect(address: tuple[str, int], timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = sock.recv(min(n - got, READ_BYTES))
        if not part:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def measure_round_trips(delay_s: float, count: int = 20) -> dict[str, float]:
    """Ping-pong of one byte through a fresh proxy to an echo server: the connection's first
    exchange (the handshake's round trip included) and the next ``count`` ones, in ms."""
    peer = LoopbackServer(echo)
    try:
        with DelayProxy(peer.address, delay_s) as proxy, connect(proxy.address) as sock:
            times = []
            for _ in range(count + 1):
                started = time.perf_counter()
                sock.sendall(b"x")
                recv_exactly(sock, 1)
                times.append((time.perf_counter() - started) * 1000)
    finally:
        peer.close()
    first, rest = times[0], sorted(times[1:])
    return {
        "delay_ms": delay_s * 1000, "first_ms": round(first, 3), "min_ms": round(rest[0], 3),
        "median_ms": round(rest[len(rest) // 2], 3), "max_ms": round(rest[-1], 3), "count": count,
    }  # fmt: skip


def measure_throughput(delay_s: float, megabytes: int = 256, chunk: int = READ_BYTES) -> dict[str, float]:
    """Bulk transfer of ``megabytes`` MB through a fresh proxy into a sink (loopback); MB/s from
    the first byte sent to the sink's count coming back (that includes one round trip)."""
    peer = LoopbackServer(sink)
    payload = memoryview(os.urandom(chunk))
    total = megabytes * 1_000_000
    try:
        with DelayProxy(peer.address, delay_s) as proxy, connect(proxy.address, timeout_s=120) as sock:
            started = time.perf_counter()
            sent = 0
            while sent < total:
                n = min(chunk, total - sent)
                sock.sendall(payload[:n])
                sent += n
            sock.shutdown(socket.SHUT_WR)
            (received,) = struct.unpack("!Q", recv_exactly(sock, 8))
            seconds = time.perf_counter() - started
    finally:
        peer.close()
    if received != total:
        raise RuntimeError(f"the sink received {received} of {total} bytes")
    return {"delay_ms": delay_s * 1000, "megabytes": megabytes, "seconds": round(seconds, 3), "mb_per_s": round(total / 1e6 / seconds, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dicom_assets_tests.delay_proxy [DELAY_MS]``: the proxy's round trip and throughput."""
    import json
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    delay_s = float(args[0]) / 1000 if args else 0.010
    print(json.dumps({"round_trip": measure_round_trips(delay_s), "throughput": measure_throughput(delay_s)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
