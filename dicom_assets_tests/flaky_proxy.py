"""A fault-injecting loopback TCP proxy for tests: a bad VPN between the DICOM client and a PACS.

Why: retrieval has to survive what a hospital VPN does to long C-MOVE/C-GET associations:
connections reset in the middle of a transfer (the client sees ECONNRESET, not a clean close),
new connections refused for a moment while the tunnel comes back, and outages longer than the
client is willing to wait. Mocks cannot reproduce those socket-level failures; this proxy does,
with real sockets, between the client and the bundled PACS or Orthanc::

    with FlakyProxy(("127.0.0.1", pacs_port), reset_every=(1.0, 3.0)) as proxy:
        retrieve(..., port=proxy.port)     # the client talks to the proxy, not the PACS
        assert proxy.resets > 0

Design notes (the reasons behind the less obvious choices):

* One event-loop thread (``selectors``) owns every socket, and every fault is carried out by
  that thread. Closing a socket from another thread is not enough on Linux: while a ``recv()``,
  ``accept()`` or ``poll()`` in some thread still holds the socket, the kernel defers the real
  close, so the RST (or the refusal) would only happen once that call returns, i.e. maybe never.
  The public methods therefore hand their work to the loop and wait until it is done: when
  ``reset_now()`` returns, the RSTs have been sent and the port refuses connections.
* A reset closes both sockets of every pair with ``SO_LINGER {on, 0}``, so the kernel sends an
  RST (not a FIN) to the client and to the PACS and drops unsent data, as a dead VPN would.
* Refusal keeps the port. On Linux, ``shutdown(SHUT_RD)`` on a listening socket that was bound
  to an explicit port stops listening (SYNs are answered with RST, so ``connect()`` raises
  ECONNREFUSED) but keeps the port bound, so nobody can take it during the window, and
  ``listen()`` on the same socket opens it again. Port 0 is therefore resolved to a real port
  first and bound explicitly. Where that does not work, the listener is closed and re-bound
  (SO_REUSEADDR) with retries; a re-bind that still fails is logged, kept in ``error`` and
  raised by ``check()`` and ``stop()``: a proxy that silently stays down would turn a
  "flaky network" test into an "outage" test.
* Only literal loopback addresses are accepted, for both ends: a test helper must never
  become a path to a real network.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import random
import selectors
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Callable

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
"""Bytes per ``recv()``: large, so loopback DICOM traffic (tens of MB/s) costs few loop turns."""
LISTEN_BACKLOG = 128
REBIND_ATTEMPTS = 20
REBIND_PAUSE_S = 0.05
REBIND_RETRY_S = 0.5
"""After a failed re-bind the loop keeps the port closed and tries again this much later."""
MAX_TICK_S = 0.5
COMMAND_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 10.0

_RST_LINGER = struct.pack("ii", 1, 0)
_WAKE = "wake"
_LISTENER = "listener"
_CONNECT_PENDING = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY}
_COUNTERS = ("resets", "connections_reset", "connections", "refused_windows",
             "bytes_up", "bytes_down", "upstream_failures")


class ProxyError(RuntimeError):
    """The proxy could not do what a test relies on (re-bind its port, stop its thread)."""


def loopback_family(host: str) -> socket.AddressFamily:
    """Address family of a literal loopback address; anything else raises ValueError.

    Why literal: a host name could resolve to a real network; the proxy must never leave loopback.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not a literal IP address; FlakyProxy only uses "
                         "loopback addresses such as 127.0.0.1 or ::1") from None
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address; FlakyProxy only uses loopback")
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def rst_close(sock: socket.socket) -> None:
    """Close with SO_LINGER {on, 0}: the kernel sends RST and drops unsent data (no FIN, no TIME_WAIT)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    except OSError:
        pass  # the connection is already dead; closing is all that is left to do
    sock.close()


def _set_nodelay(sock: socket.socket) -> None:
    """No Nagle delay: DICOM PDUs are request/response, a 40 ms stall per PDU would dominate."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _is_listening(sock: socket.socket) -> bool | None:
    """Whether the kernel says the socket listens (SO_ACCEPTCONN); None where it cannot tell."""
    option = getattr(socket, "SO_ACCEPTCONN", None)
    if option is None:
        return None
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, option))
    except OSError:
        return None


def _bind(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket bound to (host, port) with SO_REUSEADDR, not yet listening.

    SO_REUSEADDR lets the port be bound again while earlier connections on it sit in TIME_WAIT.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_explicit_port(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    """Like ``_bind``, but port 0 is first resolved to a free port, then bound explicitly.

    Why: on Linux only a port bound explicitly stays reserved across ``shutdown(SHUT_RD)``; a port
    the kernel picked is released and ``listen()`` would then pick a new one. The probe socket
    keeps the port until the real socket holds it, so there is no window to lose it.
    """
    if port:
        return _bind(family, host, port)
    with _bind(family, host, 0) as probe:
        return _bind(family, host, probe.getsockname()[1])


@dataclass(eq=False)
class _End:
    """One socket of a forwarded connection and the bytes waiting to be written to it."""

    sock: socket.socket
    is_client: bool
    outbox: bytearray = field(default_factory=bytearray)
    eof: bool = False
    """Its peer half-closed: ``recv()`` returned b""."""
    shut_wr: bool = False
    """The other peer's half-close has been passed on to it (``shutdown(SHUT_WR)``)."""
    events: int = 0
    """What the selector watches on it now; 0 means not registered."""


@dataclass(eq=False)
class _Pair:
    """A client connection and the proxy's own connection to the target."""

    client: _End
    upstream: _End
    connecting: bool = True
    closed: bool = False

    def other(self, end: _End) -> _End:
        return self.upstream if end is self.client else self.client

    def ends(self) -> tuple[_End, _End]:
        return self.client, self.upstream


@dataclass(eq=False)
class _Command:
    """Work handed from a caller's thread to the loop thread, which owns all the sockets."""

    fn: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class FlakyProxy:
    """Loopback TCP proxy that resets connections, refuses new ones, and simulates outages.

    ``target``: the (loopback host, port) to forward to. ``reset_every``: (low, high) seconds;
    every connection pair is reset at intervals drawn uniformly from it with
    ``random.Random(seed)`` (measured from the previous reset; a reset due while the port is
    refusing is skipped); None means no periodic resets. ``refuse_for_s``: how long new
    connections are refused after each reset (0: not at all). ``port``: 0 picks a free loopback
    port; either way the port stays the same across refusals. ``link_bytes_per_s``: the link's
    bandwidth, shared by every connection in both directions (a token bucket; None: unlimited),
    so that a transfer lasts long enough for resets to hit it.

    Counters (read them any time; ``stats()`` gives a consistent snapshot):
    ``resets`` reset events (periodic, ``reset_now()``, ``outage()``, ``go_down()``);
    ``connections_reset`` connection pairs killed by those events; ``connections`` connections
    accepted; ``refused_windows`` times the port went from accepting to refusing;
    ``bytes_up`` / ``bytes_down`` bytes delivered to the target / to the client;
    ``upstream_failures`` accepted connections whose connect to the target failed (the client
    then sees a reset, because the proxy had already accepted it).
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        reset_every: tuple[float, float] | None = (1.0, 3.0),
        refuse_for_s: float = 0.3,
        seed: int = 0,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        link_bytes_per_s: float | None = None,
    ) -> None:
        self._target_family = loopback_family(target[0])
        self._family = loopback_family(listen_host)
        if reset_every is not None and not 0 < reset_every[0] <= reset_every[1]:
            raise ValueError(f"reset_every must be (low, high) with 0 < low <= high, not {reset_every}")
        if refuse_for_s < 0:
            raise ValueError(f"refuse_for_s must be >= 0, not {refuse_for_s}")
        self.target = (target[0], int(target[1]))
        self.reset_every = reset_every
        self.refuse_for_s = float(refuse_for_s)
        self.listen_host = listen_host
        self.port = int(port)
        self.error: BaseException | None = None
        self.resets = self.connections_reset = self.connections = self.refused_windows = 0
        self.bytes_up = self.bytes_down = self.upstream_failures = 0
        self._stats_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._commands: deque[_Command] = deque()
        self._commands_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop_done = False
        # Owned by the loop thread once it runs:
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._listening = False
        self._pairs: set[_Pair] = set()
        self._down_until: float | None = None
        self._next_reset_at = math.inf
        self.link_bytes_per_s = link_bytes_per_s
        self._tokens = 0.0 if link_bytes_per_s is None else float(RECV_BYTES)
        self._tokens_at = time.monotonic()
        self._throttled_until: float | None = None

    # ----------------------------------------------------------------- public API

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.stop()
            return
        try:  # do not let a proxy problem hide the test's own failure
            self.stop()
        except ProxyError:
            log.exception("FlakyProxy.stop() failed while another exception was propagating")

    def start(self) -> FlakyProxy:
        """Bind and listen (in the caller's thread, so a bind failure raises here), then run the loop."""
        if self._thread is not None:
            raise RuntimeError("a FlakyProxy can only be started once")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        try:
            self._listener = _bind_explicit_port(self._family, self.listen_host, self.port)
            self.port = self._listener.getsockname()[1]
            self._start_listening()
        except BaseException:
            self._teardown()
            raise
        if self.reset_every is not None:
            self._next_reset_at = time.monotonic() + self._rng.uniform(*self.reset_every)
        self._thread = threading.Thread(target=self._run, name=f"flaky-proxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Reset every connection, close every socket, join the thread; raise if anything went wrong.

        Safe to call again. Raises ProxyError if the thread does not stop or if the proxy failed earlier
        (e.g. could not re-bind its port), so such a failure is never silent.
        """
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(JOIN_TIMEOUT_S)
        if thread.is_alive():
            raise ProxyError(f"FlakyProxy thread {thread.name} did not stop within {JOIN_TIMEOUT_S} s")
        self.check()

    def check(self) -> None:
        """Raise ProxyError if the proxy failed at any point (a failed re-bind, a crashed loop)."""
        if self.error is not None:
            raise ProxyError(f"FlakyProxy failed: {self.error!r}") from self.error

    def reset_now(self) -> None:
        """One reset now: RST every connection pair, then refuse new connections for ``refuse_for_s``."""
        self._submit(lambda: self._reset(self.refuse_for_s))

    def outage(self, seconds: float) -> None:
        """Reset everything now and refuse new connections for ``seconds`` (then accept again)."""
        if seconds < 0:
            raise ValueError(f"outage must be >= 0 s, not {seconds}")
        self._submit(lambda: self._reset(seconds))

    def go_down(self) -> None:
        """Reset everything now and refuse new connections until ``come_up()``."""
        self._submit(lambda: self._reset(math.inf))

    def come_up(self) -> None:
        """Accept connections again right now (ends an outage or a refusal window early)."""
        self._submit(self._come_up)

    @property
    def is_up(self) -> bool:
        """Whether the port accepts connections now (False during refusal windows and outages)."""
        return self._listening

    @property
    def active_connections(self) -> int:
        """Connection pairs open now."""
        return len(self._pairs)

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the counters."""
        with self._stats_lock:
            return {name: getattr(self, name) for name in _COUNTERS}

    def describe(self) -> str:
        """One line for logs and assertion messages: where, state, and every counter."""
        state = "up" if self.is_up else "refusing"
        counters = " ".join(f"{name}={value}" for name, value in self.stats().items())
        return (f"FlakyProxy {self.listen_host}:{self.port} -> {self.target[0]}:{self.target[1]} "
                f"{state} active={self.active_connections} {counters}")

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    # ------------------------------------------------ handing work to the loop thread

    def _submit(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the loop thread and wait for it; its exception is raised here."""
        if self._thread is None:
            raise RuntimeError("FlakyProxy is not started")
        if threading.current_thread() is self._thread:
            fn()
            return
        command = _Command(fn)
        with self._commands_lock:
            if self._loop_done:
                raise RuntimeError("FlakyProxy is stopped")
            self._commands.append(command)
        self._wake()
        if not command.done.wait(COMMAND_TIMEOUT_S):
            raise ProxyError(f"FlakyProxy loop did not run a command within {COMMAND_TIMEOUT_S} s")
        if command.error is not None:
            raise command.error

    def _wake(self) -> None:
        """Interrupt the loop's ``select()``; a full wake-up buffer means it is awake anyway."""
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _run_commands(self) -> None:
        while True:
            with self._commands_lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            try:
                command.fn()
            except BaseException as exc:  # handed to the caller, who raises it
                command.error = exc
            command.done.set()

    def _fail_pending_commands(self) -> None:
        with self._commands_lock:
            self._loop_done = True
            pending, self._commands = list(self._commands), deque()
        for command in pending:
            command.error = RuntimeError("FlakyProxy is stopped")
            command.done.set()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        """The loop thread: wait for socket events, then run commands, then fire timers."""
        try:
            while not self._stopping:
                assert self._sel is not None
                for key, mask in self._sel.select(self._tick_timeout()):
                    self._dispatch(key, mask)
                self._run_commands()
                self._fire_timers()
        except BaseException as exc:
            self.error = self.error or exc
            log.exception("FlakyProxy loop crashed")
        finally:
            self._teardown()
            self._fail_pending_commands()

    def _tick_timeout(self) -> float:
        deadline = min(self._next_reset_at, math.inf if self._down_until is None else self._down_until,
                       math.inf if self._throttled_until is None else self._throttled_until)
        return max(0.0, min(MAX_TICK_S, deadline - time.monotonic()))

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data is _WAKE:
            self._drain_wake()
        elif key.data is _LISTENER:
            self._accept_all()
        else:
            pair, end = key.data
            self._on_pair_event(pair, end, mask)

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _fire_timers(self) -> None:
        """End a refusal window that is over; do a periodic reset that is due (only while up)."""
        now = time.monotonic()
        if self._throttled_until is not None and now >= self._throttled_until:
            self._throttled_until = None  # the link has bandwidth again: read on every pair
            for pair in list(self._pairs):
                self._watch(pair)
        if self._down_until is not None and now >= self._down_until:
            try:
                self._come_up()
            except ProxyError:
                pass  # logged and kept in self.error by _come_up; retried later
        if now >= self._next_reset_at:
            assert self.reset_every is not None
            self._next_reset_at = now + self._rng.uniform(*self.reset_every)
            if self._down_until is None:
                self._reset(self.refuse_for_s)

    def _teardown(self) -> None:
        """Close everything the proxy owns; connections get RST (the network is gone)."""
        for pair in list(self._pairs):
            self._abort(pair)
        self._listening = False
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._listener = self._wake_r = self._wake_w = None
        if self._sel is not None:
            self._sel.close()
            self._sel = None

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    # ------------------------------------------------------ resets and refusals

    def _reset(self, refuse_for: float) -> None:
        """Refuse new connections for ``refuse_for`` seconds (inf: until come_up), then RST every pair.

        Refusing first means a client that reconnects as soon as it sees the RST is refused, as
        it would be by a VPN that is down, instead of being accepted and reset a second time.
        """
        killed = list(self._pairs)
        opens_window = refuse_for > 0 and self._listening
        # Count first, in one step: whoever sees the RST or the refusal must also see it counted.
        self._count(resets=1, connections_reset=len(killed), refused_windows=int(opens_window))
        log.debug("FlakyProxy :%d resetting %d connection(s), refusing for %s s", self.port,
                  len(killed), refuse_for)
        if refuse_for > 0:
            deadline = time.monotonic() + refuse_for
            # a short refusal window never shortens an outage that is already running
            self._down_until = max(deadline, self._down_until or 0.0)
            self._stop_listening()
        for pair in killed:
            self._abort(pair)

    def _come_up(self) -> None:
        """Listen again on the same port; a failure is logged, kept in ``error``, retried, and raised."""
        self._down_until = None
        if self._listening:
            return
        try:
            self._start_listening()
        except OSError as exc:
            error = ProxyError(f"could not listen on {self.listen_host}:{self.port} again: {exc!r}")
            self.error = error
            self._down_until = time.monotonic() + REBIND_RETRY_S
            log.error("FlakyProxy: %s; still refusing, retrying in %s s", error, REBIND_RETRY_S)
            raise error from exc

    def _stop_listening(self) -> None:
        """Make new ``connect()``s fail with ECONNREFUSED now, keeping the port bound if the OS lets us."""
        if not self._listening:
            return
        assert self._sel is not None and self._listener is not None
        self._sel.unregister(self._listener)
        self._listening = False
        sock = self._listener
        try:
            sock.shutdown(socket.SHUT_RD)  # Linux: LISTEN -> CLOSE, explicitly bound port kept
            if _is_listening(sock) is False:
                return
        except OSError:
            pass
        sock.close()  # portable fallback: the port is re-bound when the window ends
        self._listener = None

    def _start_listening(self) -> None:
        """listen() on the kept socket, or re-bind the same port; raises OSError if both fail."""
        assert self._sel is not None
        sock = self._listener
        if sock is not None and not self._relisten(sock):
            sock.close()
            sock = self._listener = None
        if sock is None:
            sock = self._listener = self._rebind()
            sock.listen(LISTEN_BACKLOG)
        self._sel.register(sock, selectors.EVENT_READ, _LISTENER)
        self._listening = True

    def _relisten(self, sock: socket.socket) -> bool:
        """Whether ``listen()`` on the kept socket worked and it still has our port."""
        try:
            sock.listen(LISTEN_BACKLOG)
            return sock.getsockname()[1] == self.port
        except OSError as exc:
            log.warning("FlakyProxy: listen() on the kept socket failed (%r); re-binding", exc)
            return False

    def _rebind(self) -> socket.socket:
        """Bind the same port again, retrying: it can be briefly busy. The last error is raised."""
        for attempt in range(1, REBIND_ATTEMPTS + 1):
            try:
                return _bind(self._family, self.listen_host, self.port)
            except OSError as exc:
                if attempt == REBIND_ATTEMPTS:
                    raise
                log.debug("FlakyProxy: re-binding port %d failed (%r), attempt %d/%d",
                            self.port, exc, attempt, REBIND_ATTEMPTS)
                time.sleep(REBIND_PAUSE_S)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------- forwarding

    def _accept_all(self) -> None:
        while self._listening:
            assert self._listener is not None
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("FlakyProxy: accept() failed: %r", exc)
                return
            self._count(connections=1)
            self._open_pair(client)

    def _open_pair(self, client: socket.socket) -> None:
        """Start a non-blocking connect to the target for a newly accepted client."""
        client.setblocking(False)
        _set_nodelay(client)
        upstream = socket.socket(self._target_family, socket.SOCK_STREAM)
        upstream.setblocking(False)
        _set_nodelay(upstream)
        pair = _Pair(_End(client, is_client=True), _End(upstream, is_client=False))
        self._pairs.add(pair)
        result = upstream.connect_ex(self.target)
        if result == 0:
            pair.connecting = False
        elif result not in _CONNECT_PENDING:
            self._upstream_failed(pair, result)
            return
        self._watch(pair)

    def _finish_connect(self, pair: _Pair) -> None:
        result = pair.upstream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if result:
            self._upstream_failed(pair, result)
            return
        pair.connecting = False
        self._watch(pair)

    def _upstream_failed(self, pair: _Pair, result: int) -> None:
        log.warning("FlakyProxy: connecting to %s:%d failed: %s", *self.target, errno.errorcode.get(result, result))
        self._count(upstream_failures=1)
        self._abort(pair)

    def _wanted(self, pair: _Pair, end: _End) -> int:
        """Events to watch on ``end``: read only while the other side has nothing queued (backpressure)."""
        if pair.connecting:
            return selectors.EVENT_WRITE if end is pair.upstream else 0
        events = 0
        if not end.eof and not pair.other(end).outbox and self._throttled_until is None:
            events |= selectors.EVENT_READ
        if end.outbox:
            events |= selectors.EVENT_WRITE
        return events

    def _watch(self, pair: _Pair) -> None:
        """Bring the selector registrations of both ends in line with ``_wanted``."""
        assert self._sel is not None
        for end in pair.ends():
            wanted = self._wanted(pair, end)
            if wanted == end.events:
                continue
            if end.events == 0:
                self._sel.register(end.sock, wanted, (pair, end))
            elif wanted == 0:
                self._sel.unregister(end.sock)
            else:
                self._sel.modify(end.sock, wanted, (pair, end))
            end.events = wanted

    def _on_pair_event(self, pair: _Pair, end: _End, mask: int) -> None:
        if pair.closed:
            return  # killed earlier in this batch of events
        if pair.connecting:
            self._finish_connect(pair)
            return
        mask &= end.events  # an earlier event in this batch may have changed what we want
        if mask & selectors.EVENT_WRITE:
            self._flush(pair, end)
        if mask & selectors.EVENT_READ and not pair.closed:
            self._pump(pair, end)
        if not pair.closed:
            self._finish_if_done(pair)
        if not pair.closed:
            self._watch(pair)

    def _pump(self, pair: _Pair, src: _End) -> None:
        """Read what ``src`` sent and forward it (or its half-close) to the other end."""
        dst = pair.other(src)
        try:
            data = src.sock.recv(self._allowance())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # the peer reset: pass the reset on, as the network would
            log.debug("FlakyProxy: recv failed (%r); resetting the pair", exc)
            self._abort(pair)
            return
        if not data:
            src.eof = True
        else:
            dst.outbox += data
            self._spend(len(data))
        self._flush(pair, dst)

    def _allowance(self) -> int:
        """Bytes one read may take: what the link's token bucket holds (all when unlimited)."""
        if self.link_bytes_per_s is None:
            return RECV_BYTES
        now = time.monotonic()
        self._tokens = min(float(RECV_BYTES), self._tokens + (now - self._tokens_at) * self.link_bytes_per_s)
        self._tokens_at = now
        return max(1, min(RECV_BYTES, int(self._tokens)))

    def _spend(self, n: int) -> None:
        """Take ``n`` bytes from the bucket; once it is empty, no pair reads until it refills."""
        if self.link_bytes_per_s is None:
            return
        self._tokens -= n
        if self._tokens < 1:
            self._throttled_until = time.monotonic() + (1 - self._tokens) / self.link_bytes_per_s
            for pair in list(self._pairs):
                self._watch(pair)

    def _flush(self, pair: _Pair, dst: _End) -> None:
        """Write as much of ``dst.outbox`` as the socket takes; pass a half-close on once drained."""
        while dst.outbox:
            try:
                sent = dst.sock.send(dst.outbox)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("FlakyProxy: send failed (%r); resetting the pair", exc)
                self._abort(pair)
                return
            del dst.outbox[:sent]
            self._count(**{"bytes_down" if dst.is_client else "bytes_up": sent})
        if pair.other(dst).eof and not dst.shut_wr:
            try:
                dst.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._abort(pair)
                return
            dst.shut_wr = True

    def _finish_if_done(self, pair: _Pair) -> None:
        """Both sides half-closed and everything delivered: close both sockets normally."""
        if all(end.eof and end.shut_wr for end in pair.ends()):
            self._close_pair(pair, rst=False)

    def _abort(self, pair: _Pair) -> None:
        """Close both sockets with RST."""
        self._close_pair(pair, rst=True)

    def _close_pair(self, pair: _Pair, *, rst: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        for end in pair.ends():
            if end.events and self._sel is not None:
                self._sel.unregister(end.sock)
                end.events = 0
            if rst:
                rst_close(end.sock)
            else:
                end.sock.close()
