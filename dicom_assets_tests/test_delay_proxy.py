"""Tests of the WAN delay proxy itself, with real loopback sockets only.

Why: the benchmark's "over a WAN" figures are only as good as the delay it adds. A proxy that
delivered early, reordered or dropped bytes under load, or swallowed a reset, would make the
figures (or a test over it) right for the wrong reason. No timed assertion can flake here: a
round trip is never shorter than twice the delay by construction, and the upper bound is loose
(50 ms) and applies to the fastest of several round trips. Throughput is measured, not asserted
(``python -m dicom_assets_tests.delay_proxy``).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import threading
import time

import pytest

from dicom_assets_tests.delay_proxy import (
    DelayProxy,
    LoopbackServer,
    connect,
    echo,
    peak_overlap,
    recv_exactly,
)

pytestmark = pytest.mark.timeout(30)

DELAY_S = 0.010
SLACK_S = 0.050
PAYLOAD = 24 * 1024 * 1024


def test_a_round_trip_takes_twice_the_delay_and_the_first_one_a_handshake_more() -> None:
    peer = LoopbackServer(echo)
    try:
        with DelayProxy(peer.address, DELAY_S) as proxy:
            before_connect = time.perf_counter()
            with connect(proxy.address) as sock:
                sock.sendall(b"?")
                assert recv_exactly(sock, 1) == b"?"
                first = time.perf_counter() - before_connect
                trips = []
                for n in range(10):
                    started = time.perf_counter()
                    sock.sendall(bytes([n]))
                    assert recv_exactly(sock, 1) == bytes([n])
                    trips.append(time.perf_counter() - started)
    finally:
        peer.close()
    # SYN + SYN-ACK, then the request and its answer: 4 one-way delays from connect() on.
    assert 4 * DELAY_S <= first < 4 * DELAY_S + SLACK_S, first
    assert all(t >= 2 * DELAY_S for t in trips), trips
    assert min(trips) < 2 * DELAY_S + SLACK_S, trips


def _exchange(sock: socket.socket, outgoing: bytes, incoming_size: int, chunk_sizes: random.Random) -> bytes:
    """Send ``outgoing`` in chunks of random sizes while reading ``incoming_size`` bytes; returns them."""
    received: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            received.append(recv_exactly(sock, incoming_size))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    view, sent = memoryview(outgoing), 0
    while sent < len(outgoing):
        n = chunk_sizes.choice((1, 7, 1500, 65536, 1 << 20))
        sock.sendall(view[sent : sent + n])
        sent += n
    thread.join(20)
    assert not errors and received, errors
    return received[0]


def test_large_random_payloads_arrive_intact_and_in_order_both_ways_at_once() -> None:
    up, down = os.urandom(PAYLOAD), os.urandom(PAYLOAD)
    server_got: list[bytes] = []
    server_done = threading.Event()

    def swap(sock: socket.socket) -> None:
        try:
            server_got.append(_exchange(sock, down, len(up), random.Random(2)))
        finally:
            server_done.set()

    peer = LoopbackServer(swap)
    try:
        with DelayProxy(peer.address, DELAY_S) as proxy:
            with connect(proxy.address, timeout_s=20) as sock:
                client_got = _exchange(sock, up, len(down), random.Random(1))
                assert server_done.wait(20)  # the last of ``up`` may still be in the delay line
            stats = _wait_until_closed(proxy)
    finally:
        peer.close()
    assert hashlib.sha256(client_got).digest() == hashlib.sha256(down).digest()
    assert server_got and hashlib.sha256(server_got[0]).digest() == hashlib.sha256(up).digest()
    assert stats["bytes_up"] == stats["bytes_down"] == PAYLOAD
    assert stats["connections"] == 1 and stats["resets"] == 0


def _wait_until_closed(proxy: DelayProxy) -> dict[str, int]:
    deadline = time.monotonic() + 5
    while proxy.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return proxy.stats()


def test_a_half_close_travels_behind_the_data() -> None:
    got: list[bytes] = []

    def serve(sock: socket.socket) -> None:
        data = b""
        while chunk := sock.recv(65536):  # until the client's FIN, passed on after its data
            data += chunk
        got.append(data)
        sock.sendall(b"bye")

    peer = LoopbackServer(serve)
    try:
        with DelayProxy(peer.address, DELAY_S) as proxy:
            with connect(proxy.address) as sock:
                sock.sendall(b"hello " * 10000)
                sock.shutdown(socket.SHUT_WR)
                assert recv_exactly(sock, 3) == b"bye"
                assert sock.recv(1) == b""  # the server's FIN, after its answer
            stats = _wait_until_closed(proxy)
    finally:
        peer.close()
    assert got == [b"hello " * 10000]
    assert stats["active"] == 0 and stats["resets"] == 0


def test_a_reset_arrives_as_a_reset_after_the_data_sent_before_it() -> None:
    got: list[bytes] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def serve(sock: socket.socket) -> None:
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            errors.append(exc)
        finally:
            got.append(data)
            done.set()

    peer = LoopbackServer(serve)
    try:
        with DelayProxy(peer.address, DELAY_S) as proxy:
            sock = connect(proxy.address)
            sock.sendall(b"data " * 1000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # an RST, no FIN
            assert done.wait(10)
            stats = _wait_until_closed(proxy)
    finally:
        peer.close()
    assert len(errors) == 1 and isinstance(errors[0], ConnectionResetError), errors
    assert got == [b"data " * 1000]
    assert stats["resets"] == 1 and stats["active"] == 0


def test_it_counts_the_connections_open_at_once() -> None:
    peer = LoopbackServer(echo)
    try:
        with DelayProxy(peer.address, 0.001) as proxy:
            socks = [connect(proxy.address) for _ in range(3)]
            for s in socks:
                s.sendall(b"x")
                assert recv_exactly(s, 1) == b"x"
            for s in socks:
                s.close()
            stats, intervals = _wait_until_closed(proxy), proxy.intervals()
    finally:
        peer.close()
    assert stats["connections"] == 3 and stats["peak_active"] == 3 and stats["active"] == 0
    assert len(intervals) == 3 and all(closed is not None for _, closed in intervals)
    assert peak_overlap(intervals) == 3
    assert peak_overlap([(0, 1), (1, 2), (1.5, None)]) == 2
    assert peak_overlap([(0, 10), (2, 3)], start=5) == 1


def test_only_loopback_addresses() -> None:
    with pytest.raises(ValueError):
        DelayProxy(("192.0.2.1", 104), DELAY_S)
    with pytest.raises(ValueError):
        DelayProxy(("127.0.0.1", 104), DELAY_S, listen_host="0.0.0.0")
