"""Tests of the fault-injecting proxy itself, with real loopback sockets only.

Why: the resilience tests put FlakyProxy between the DICOM client and a real PACS and trust it
to fail exactly as promised: a reset must reach both ends as an RST mid-transfer, a refusal must
be a TCP-level ECONNREFUSED on the same port, and an outage must last until it is ended. If the
proxy quietly did less (a FIN instead of an RST, an accept instead of a refusal), those tests
would pass for the wrong reason.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import threading
import time
from types import TracebackType
from typing import Callable

import pytest

from dicom_assets_tests.flaky_proxy import FlakyProxy, ProxyError

pytestmark = pytest.mark.timeout(30)

CHUNK = 256 * 1024
Handler = Callable[[socket.socket, threading.Event], None]


class Server:
    """A loopback TCP server running ``handler`` in a thread per connection, recording its errors."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.errors: list[OSError] = []
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.address = ("127.0.0.1", self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, name="test-server", daemon=True)

    def __enter__(self) -> Server:
        self._acceptor.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        for thread in self._threads:
            thread.join(10)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="test-handler", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                self.handler(conn, self._stop)
            except OSError as exc:
                self.errors.append(exc)
            finally:
                self.finished.set()


def echo(conn: socket.socket, stop: threading.Event) -> None:
    """Send back everything, then half-close: an end-to-end integrity check in both directions."""
    while data := conn.recv(CHUNK):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def stream_forever(conn: socket.socket, stop: threading.Event) -> None:
    """Send data until the connection breaks: a transfer that is always in the middle."""
    chunk = os.urandom(64 * 1024)
    while not stop.is_set():
        conn.sendall(chunk)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def echo_roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(CHUNK):
        parts.append(data)
    return b"".join(parts)


def read_at_least(sock: socket.socket, count: int) -> None:
    got = 0
    while got < count:
        data = sock.recv(CHUNK)
        assert data, "the stream ended early"
        got += len(data)


def read_until_error(sock: socket.socket, timeout: float) -> OSError | None:
    """Read until the connection fails; None means it ended with a clean EOF instead."""
    sock.settimeout(timeout)
    try:
        while sock.recv(CHUNK):
            pass
    except OSError as exc:
        return exc
    return None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        connect(port).close()


def connect_when_up(port: int, timeout: float) -> float:
    """Retry connect() until it succeeds; returns the time it did. Only refusals are retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(port).close()
            return time.monotonic()
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"port {port} still refused after {timeout} s"
            time.sleep(0.02)


def test_only_loopback_addresses_are_accepted() -> None:
    for target, listen_host in [(("10.0.0.1", 104), "127.0.0.1"), (("localhost", 104), "127.0.0.1"),
                                (("127.0.0.1", 104), "0.0.0.0")]:
        with pytest.raises(ValueError, match="loopback"):
            FlakyProxy(target, listen_host=listen_host)


def test_forwards_20_mb_both_ways_intact_and_fast() -> None:
    payload = os.urandom(20 * 1024 * 1024)
    with Server(echo) as server, FlakyProxy(server.address, reset_every=None) as proxy:
        started = time.monotonic()
        with connect(proxy.port) as sock:
            sock.settimeout(20)

            def send() -> None:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send, name="test-sender")
            sender.start()
            echoed = read_all(sock)
            sender.join(10)
        elapsed = time.monotonic() - started
        stats = proxy.stats()
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)
    assert stats["connections"] == 1 and stats["resets"] == 0
    assert not server.errors
    print(f"\n[proxy] {2 * len(payload) / elapsed / 1e6:.0f} MB/s through the proxy, both ways together")


def test_a_link_rate_spreads_a_transfer_over_time() -> None:
    """4 MB each way over a 4 MB/s link (both directions share it) cannot take less than ~2 s."""
    payload = os.urandom(4 * 1024 * 1024)
    with Server(echo) as server, FlakyProxy(server.address, reset_every=None, link_bytes_per_s=4e6) as proxy:
        started = time.monotonic()
        with connect(proxy.port) as sock:
            sock.settimeout(30)
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            echoed = read_all(sock)
            sender.join(10)
        elapsed = time.monotonic() - started
    assert echoed == payload
    assert elapsed >= 1.8, f"8 MB crossed a 4 MB/s link in {elapsed:.2f} s: the link rate is not applied"


def test_reset_now_sends_rst_to_both_sides_mid_transfer() -> None:
    with Server(stream_forever) as server, FlakyProxy(server.address, reset_every=None) as proxy:
        with connect(proxy.port) as sock:
            read_at_least(sock, 1024 * 1024)
            proxy.reset_now()
            error = read_until_error(sock, timeout=5)
        assert isinstance(error, ConnectionResetError), f"client saw {error!r}, not a reset"
        assert server.finished.wait(5), "the PACS side was not disconnected"
        assert len(server.errors) == 1
        assert isinstance(server.errors[0], (ConnectionResetError, BrokenPipeError)), server.errors
        assert proxy.stats() | {"bytes_up": 0, "bytes_down": 0} == {
            "resets": 1, "connections_reset": 1, "connections": 1, "refused_windows": 1,
            "bytes_up": 0, "bytes_down": 0, "upstream_failures": 0}
        assert proxy.stats()["bytes_down"] >= 1024 * 1024
        assert proxy.active_connections == 0
        assert "resets=1" in proxy.describe()


def test_periodic_resets_interrupt_a_long_transfer_and_keep_coming() -> None:
    with Server(stream_forever) as server, \
            FlakyProxy(server.address, reset_every=(0.3, 0.6), refuse_for_s=0.1, seed=7) as proxy:
        started = time.monotonic()
        with connect(proxy.port) as sock:
            error = read_until_error(sock, timeout=5)
        assert isinstance(error, ConnectionResetError), f"client saw {error!r}, not a reset"
        assert time.monotonic() - started < 3
        assert proxy.connections_reset >= 1
        wait_for(lambda: proxy.resets >= 3, timeout=5, what="three periodic resets")
        assert proxy.refused_windows >= 3
        connect_when_up(proxy.port, timeout=3)  # and it still accepts between resets


def test_new_connections_are_refused_right_after_a_reset_then_accepted_on_the_same_port() -> None:
    with Server(echo) as server, FlakyProxy(server.address, reset_every=None, refuse_for_s=1.0) as proxy:
        port = proxy.port
        assert echo_roundtrip(port) == b"ping"
        proxy.reset_now()
        reset_done = time.monotonic()
        assert not proxy.is_up
        assert_refused(port)
        time.sleep(0.3)
        assert_refused(port)
        accepted_at = connect_when_up(port, timeout=4)
        assert accepted_at - reset_done > 0.5, "the refusal window ended too early"
        assert proxy.port == port and proxy.is_up
        assert echo_roundtrip(port, b"after the window") == b"after the window"
        assert proxy.refused_windows == 1 and proxy.resets == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keeping the port bound relies on Linux")
def test_port_stays_reserved_while_refusing_and_come_up_ends_the_window() -> None:
    with Server(echo) as server, FlakyProxy(server.address, reset_every=None, refuse_for_s=30) as proxy:
        proxy.reset_now()
        assert_refused(proxy.port)
        with socket.socket() as intruder, pytest.raises(OSError) as raised:
            intruder.bind(("127.0.0.1", proxy.port))
        assert raised.value.errno == errno.EADDRINUSE
        proxy.come_up()
        assert echo_roundtrip(proxy.port) == b"ping"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the intruder trick relies on Linux")
def test_a_port_that_cannot_be_had_back_fails_loudly() -> None:
    with Server(echo) as server:
        proxy = FlakyProxy(server.address, reset_every=None, refuse_for_s=30).start()
        try:
            proxy.reset_now()
            with socket.socket() as intruder:  # takes the port while the proxy is refusing
                intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                intruder.bind(("127.0.0.1", proxy.port))
                intruder.listen()
                with pytest.raises(ProxyError, match="again"):
                    proxy.come_up()
                assert not proxy.is_up
        finally:
            with pytest.raises(ProxyError, match="again"):
                proxy.stop()


def test_go_down_refuses_until_come_up() -> None:
    with Server(echo) as server, FlakyProxy(server.address, reset_every=None, refuse_for_s=0.1) as proxy:
        with connect(proxy.port) as live:
            live.sendall(b"hello")
            assert live.recv(CHUNK) == b"hello"
            proxy.go_down()
            assert isinstance(read_until_error(live, timeout=5), ConnectionResetError)
        down_until = time.monotonic() + 1.0  # ten times refuse_for_s: no window ends by itself
        while time.monotonic() < down_until:
            assert_refused(proxy.port)
            time.sleep(0.1)
        proxy.come_up()
        assert echo_roundtrip(proxy.port) == b"ping"
        assert proxy.stats() | {"bytes_up": 0, "bytes_down": 0} == {
            "resets": 1, "connections_reset": 1, "connections": 2, "refused_windows": 1,
            "bytes_up": 0, "bytes_down": 0, "upstream_failures": 0}


def test_outage_ends_by_itself() -> None:
    with Server(echo) as server, FlakyProxy(server.address, reset_every=None, refuse_for_s=0.1) as proxy:
        proxy.outage(0.8)
        started = time.monotonic()
        assert_refused(proxy.port)
        time.sleep(0.3)
        assert_refused(proxy.port)
        accepted_at = connect_when_up(proxy.port, timeout=4)
        assert accepted_at - started > 0.5
        assert echo_roundtrip(proxy.port) == b"ping"
        assert proxy.resets == 1 and proxy.refused_windows == 1


def test_a_dead_target_looks_like_a_reset() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound, never listening: connects are refused
        with FlakyProxy(("127.0.0.1", dead_port), reset_every=None) as proxy:
            try:  # the RST may come before connect() has returned (seen on a busy machine)
                with connect(proxy.port) as sock:
                    error: OSError | None = read_until_error(sock, timeout=5)
            except ConnectionResetError as exc:
                error = exc
            assert isinstance(error, ConnectionResetError)
            wait_for(lambda: proxy.upstream_failures == 1, timeout=5, what="the upstream failure")
            assert proxy.connections == 1 and proxy.resets == 0


def test_stop_joins_the_thread_resets_connections_and_frees_the_port() -> None:
    before = set(threading.enumerate())
    with socket.create_server(("127.0.0.1", 0)) as target:  # the kernel completes handshakes itself
        proxy = FlakyProxy(target.getsockname()[:2], reset_every=(5.0, 10.0)).start()
        port = proxy.port
        assert any(t.name == f"flaky-proxy-{port}" for t in threading.enumerate())
        with connect(port) as sock:
            sock.sendall(b"x")
            wait_for(lambda: proxy.active_connections == 1, timeout=5, what="the connection pair")
            proxy.stop()
            assert isinstance(read_until_error(sock, timeout=5), ConnectionResetError)
        proxy.stop()  # idempotent
        with pytest.raises(RuntimeError):
            proxy.reset_now()

        down = FlakyProxy(target.getsockname()[:2], reset_every=None).start()
        down.go_down()
        down.stop()

    assert set(threading.enumerate()) == before
    for freed in (port, down.port):
        with socket.socket() as again:  # no SO_REUSEADDR: fails if any socket still holds the port
            again.bind(("127.0.0.1", freed))
