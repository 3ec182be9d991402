"""The DICOM upper layer (PS3.8) and DIMSE message framing (PS3.7) for bulk C-STORE traffic.

pynetdicom decodes every PDU into objects, copies every fragment into a BytesIO and hands each
PDU through a state-machine thread: about 70 MB/s on one core, a quarter of what DCMTK's
``storescp`` does against the same PACS. Receiving a series is one long stream of P-DATA-TF
PDUs, so this module reads them into one fixed buffer with ``recv_into`` and passes dataset
fragments on as memoryviews of that buffer: no per-PDU objects, no copies, and memory that does
not grow with the size of an instance or a series.

Association negotiation is rare and small; it reuses pynetdicom's PDU classes and its
presentation-context negotiation, so only the data path is ours.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    A_P_ABORT,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

# PDU types (PS3.8 9.3)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07

#: Largest P-DATA-TF PDU we ask the peer to send; bigger PDUs mean fewer headers to parse.
MAX_PDU_RECEIVE = 128 << 10
#: An association request is at most a few hundred contexts: anything far bigger is hostile.
MAX_ASSOCIATE_PDU = 1 << 20
READ_BUFFER = 4 << 20

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

_HEADER = struct.Struct(">BxL")  # PDU type, reserved, length
_PDV = struct.Struct(">LBB")  # item length, presentation context ID, message control header
COMMAND, LAST_FRAGMENT = 0x01, 0x02  # bits of the message control header
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class ConnectionClosed(ConnectionError):
    """The peer closed the TCP connection or aborted the association."""


class ProtocolError(ConnectionError):
    """The peer sent something the upper layer does not allow; the association is aborted."""


class _Buffered:
    """A socket read through one fixed buffer; views into it stay valid until the next read."""

    def __init__(self, sock: socket.socket, size: int = READ_BUFFER) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        #: Asked when a read times out: the seconds to keep waiting (the peer is still working
        #: elsewhere, e.g. sending a C-MOVE's instances); <= 0 means give up.
        self.patience: Callable[[], float] | None = None
        self._saved_timeout: float | None = None

    def _fill(self, need: int) -> None:
        """Make at least ``need`` (<= buffer size) bytes available from ``start``."""
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.buf) - self.start < need:
            kept = self.end - self.start
            self.buf[:kept] = self.buf[self.start : self.end]
            self.start, self.end = 0, kept
        while self.end - self.start < need:
            try:
                got = self.sock.recv_into(self.view[self.end :])
            except TimeoutError:
                more = self.patience() if self.patience is not None else 0.0
                if more <= 0:
                    self._restore_timeout()
                    raise
                if self._saved_timeout is None:
                    self._saved_timeout = self.sock.gettimeout()
                self.sock.settimeout(more)  # exactly as long as the patience says, not a full timeout more
                continue
            if self._saved_timeout is not None:
                self._restore_timeout()
            if not got:
                raise ConnectionClosed("the peer closed the connection")
            self.end += got

    def _ack_now(self) -> None:
        """Before waiting for the rest of a header or command: acknowledge what came at once.

        A PACS that writes a PDU's header and its body in two writes with Nagle's algorithm on
        (Orthanc's final C-GET response) sends the body only once the header is acknowledged,
        and Linux delays that ACK up to 40 ms when it sees request/response traffic: 40 ms at
        the end of every series (C-GET, one association: 68 ms between two series, of which
        DCMTK's getscu needs some 20). TCP_QUICKACK sends a scheduled ACK now; it is cleared
        by the kernel again, so it is set before each such wait (a no-op when nothing is due).
        """
        if _QUICKACK is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass

    def _restore_timeout(self) -> None:
        if self._saved_timeout is not None:
            self.sock.settimeout(self._saved_timeout)
            self._saved_timeout = None

    def exact(self, n: int) -> bytes:
        if self.end - self.start < n:
            self._ack_now()
        self._fill(n)
        data = bytes(self.view[self.start : self.start + n])
        self.start += n
        return data

    def stream(self, n: int) -> Iterator[memoryview]:
        """``n`` bytes in pieces, each a view into the buffer valid until the next read."""
        while n:
            if self.start == self.end:
                self._fill(1)
            take = min(n, self.end - self.start)
            yield self.view[self.start : self.start + take]
            self.start += take
            n -= take


@dataclass
class Command:
    """A decoded DIMSE command set: raw values by tag (implicit VR little endian, group 0000)."""

    elements: dict[int, bytes]

    def ushort(self, tag: int, default: int | None = None) -> int | None:
        value = self.elements.get(tag)
        return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else default

    def uid(self, tag: int) -> str:
        return self.elements.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    @property
    def field(self) -> int | None:
        return self.ushort(0x00000100)

    @property
    def message_id(self) -> int:
        return self.ushort(0x00000110, 0) or 0

    @property
    def has_dataset(self) -> bool:
        return self.ushort(0x00000800, 0x0101) != 0x0101


def decode_command(data: bytes) -> Command:
    """Parse a command set; raises ProtocolError on a truncated element."""
    elements: dict[int, bytes] = {}
    offset, size = 0, len(data)
    while offset + 8 <= size:
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if offset + length > size:
            raise ProtocolError("truncated DIMSE command set")
        elements[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return Command(elements)


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def ae_title(value: str) -> bytes:
    """An AE title value: space padded to an even length."""
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def _value(value: int | str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return struct.pack("<H", value) if isinstance(value, int) else _ui(value)


def encode_command(values: dict[int, int | str | bytes]) -> bytes:
    """Encode a command set (ints as US, strings as UI, bytes as given) with its group length."""
    body = b"".join(
        struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(raw)) + raw
        for tag, raw in ((tag, _value(v)) for tag, v in sorted(values.items()))
    )
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


class Association:
    """One established association: reads PDUs/PDVs and sends P-DATA and release PDUs."""

    def __init__(self, sock: socket.socket, contexts: dict[int, PresentationContext], peer_max_pdu: int) -> None:
        self.sock = sock
        self.reader = _Buffered(sock)
        self.contexts = contexts
        self.peer_max_pdu = peer_max_pdu or (1 << 31)

    def transfer_syntax(self, context_id: int) -> str:
        context = self.contexts.get(context_id)
        if context is None:
            raise ProtocolError(f"presentation context {context_id} was not accepted")
        return str(context.transfer_syntax[0])

    def abstract_syntax(self, context_id: int) -> str:
        return str(self.contexts[context_id].abstract_syntax)

    def send_command(self, context_id: int, command: bytes) -> None:
        """Send a command set as one or more P-DATA-TF PDUs within the peer's maximum."""
        self._send_fragments(context_id, command, COMMAND)

    def send_dataset(self, context_id: int, data: bytes) -> None:
        """Send an encoded dataset as one or more P-DATA-TF PDUs within the peer's maximum."""
        self._send_fragments(context_id, data, 0x00)

    def _send_fragments(self, context_id: int, data: bytes, kind: int) -> None:
        """One PDV per PDU; ``kind`` is the command bit of the message control header."""
        room = max(min(self.peer_max_pdu, MAX_PDU_RECEIVE) - 6, 64)
        view = memoryview(data)
        out = bytearray()
        for start in range(0, max(len(data), 1), room):
            piece = view[start : start + room]
            control = kind | (LAST_FRAGMENT if start + room >= len(data) else 0x00)
            out += _HEADER.pack(P_DATA_TF, len(piece) + 6) + _PDV.pack(len(piece) + 2, context_id, control) + piece
        self.sock.sendall(out)

    def messages(self, on_dataset: Callable[[int, Command], "DatasetSink"]) -> Iterator[tuple[int, Command, "DatasetSink | None"]]:
        """DIMSE messages until the peer releases the association (answered) or it ends.

        Dataset fragments go to the sink ``on_dataset`` returns for the message's command as
        they arrive; the message is yielded once its last fragment has been read, so the caller
        answers it then. The sink's ``abort()`` is called when the connection fails midway.
        """
        command = bytearray()
        parsed: Command | None = None
        sink: DatasetSink | None = None
        context_id = 0
        try:
            while True:
                pdu_type, length = _HEADER.unpack(self.reader.exact(6))
                if pdu_type == RELEASE_RQ:
                    self.reader.exact(length)
                    self.sock.sendall(_HEADER.pack(RELEASE_RP, 4) + b"\x00" * 4)
                    return
                if pdu_type == ABORT:
                    self.reader.exact(min(length, 64))
                    raise ConnectionClosed("the peer aborted the association")
                if pdu_type != P_DATA_TF:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02x} during the data transfer")
                while length > 0:
                    item_length, context_id, control = _PDV.unpack(self.reader.exact(6))
                    if item_length < 2 or item_length + 4 > length:
                        raise ProtocolError("malformed presentation data value item")
                    length -= item_length + 4
                    data_length = item_length - 2
                    if control & COMMAND:
                        command += self.reader.exact(data_length)
                        if control & LAST_FRAGMENT:
                            parsed = decode_command(bytes(command))
                            command.clear()
                            if not parsed.has_dataset:
                                yield context_id, parsed, None
                                parsed = None
                            else:
                                sink = on_dataset(context_id, parsed)
                        continue
                    if parsed is None or sink is None:
                        raise ProtocolError("a dataset fragment arrived before its command")
                    for piece in self.reader.stream(data_length):
                        sink.write(piece)
                    if control & LAST_FRAGMENT:
                        done, sink = sink, None
                        yield context_id, parsed, done
                        parsed = None
        except BaseException:
            if sink is not None:
                sink.abort()
            raise

    def abort(self) -> None:
        try:
            self.sock.sendall(_HEADER.pack(ABORT, 4) + b"\x00\x00\x00\x00")
        except OSError:
            pass


class DatasetSink(Protocol):
    """Where a message's dataset fragments go as they arrive."""

    def write(self, piece: memoryview) -> None: ...

    def abort(self) -> None: ...


@dataclass
class AssociationRequest:
    called_ae_title: str
    calling_ae_title: str
    peer_max_pdu: int
    primitive: A_ASSOCIATE
    #: The answer :func:`accept` built for this very request: (A-ASSOCIATE-AC bytes, accepted
    #: contexts by ID). Kept with the request in an :class:`AssociationCache`.
    answer: tuple[bytes, dict[int, PresentationContext]] | None = None


class AssociationCache:
    """Requests and their answers by the exact bytes of the A-ASSOCIATE-RQ.

    A PACS sending a C-MOVE's instances opens a new association for every series, each time
    with the same request (same AE titles, same hundred-odd presentation contexts). Decoding it
    and negotiating the contexts through pynetdicom's objects took 15-25 ms of Python per
    series, between the PACS's C-MOVE and its first instance; the same bytes get the same
    answer, so it is built once. Only accepted requests are kept, at most ``size`` of them.
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._requests: dict[bytes, AssociationRequest] = {}

    def get(self, raw: bytes) -> AssociationRequest | None:
        return self._requests.get(raw)

    def keep(self, raw: bytes, request: AssociationRequest) -> None:
        if len(self._requests) >= self.size:
            self._requests.pop(next(iter(self._requests)))
        self._requests[raw] = request


def read_association_request(sock: socket.socket, cache: AssociationCache | None = None) -> tuple[AssociationRequest, bytes]:
    """Read the A-ASSOCIATE-RQ that opens a connection: the request, and its bytes (the key of
    ``cache``, where an identical request earlier was kept with its answer)."""
    header = recv_exact(sock, 6)
    pdu_type, length = _HEADER.unpack(header)
    if pdu_type != ASSOCIATE_RQ or length > MAX_ASSOCIATE_PDU:
        raise ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x} of {length} bytes")
    raw = header + recv_exact(sock, length)
    known = cache.get(raw) if cache is not None else None
    if known is not None:
        return known, raw
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(raw)
    primitive = pdu.to_primitive()
    max_pdu = 0
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            max_pdu = int(item.maximum_length_received or 0)
    request = AssociationRequest(
        called_ae_title=str(primitive.called_ae_title).strip(),
        calling_ae_title=str(primitive.calling_ae_title).strip(),
        peer_max_pdu=max_pdu,
        primitive=primitive,
    )
    return request, raw


def reject(sock: socket.socket, reason: int) -> None:
    """A-ASSOCIATE-RJ, permanent, by the service user: 3 = calling AE, 7 = called AE unknown."""
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = 0x01, 0x01, reason
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    sock.sendall(pdu.encode())


def accept(sock: socket.socket, request: AssociationRequest, supported: list[PresentationContext]) -> Association:
    """Negotiate the presentation contexts and send the A-ASSOCIATE-AC (the answer is kept on
    ``request``: a request from an :class:`AssociationCache` is answered without negotiating;
    ``supported`` must then be what it was the first time, as it is for one receiver)."""
    if request.answer is None:
        request.answer = _answer(request, supported)
    ac, accepted = request.answer
    sock.sendall(ac)
    return Association(sock, accepted, request.peer_max_pdu)


def _answer(request: AssociationRequest, supported: list[PresentationContext]) -> tuple[bytes, dict[int, PresentationContext]]:
    rq = request.primitive
    results, _roles = negotiate_as_acceptor(rq.presentation_context_definition_list, supported)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = rq.calling_ae_title
    primitive.called_ae_title = rq.called_ae_title
    primitive.result, primitive.result_source = 0x00, 0x01
    primitive.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = MAX_PDU_RECEIVE
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [max_length, class_uid, version]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return pdu.encode(), {cx.context_id: cx for cx in results if cx.result == 0x00}


def abort_unaccepted(sock: socket.socket) -> None:
    """A-ABORT by the service provider, for a connection that never became an association."""
    primitive = A_P_ABORT()
    primitive.provider_reason = 0x00
    pdu = A_ABORT_RQ()
    pdu.from_primitive(primitive)
    try:
        sock.sendall(pdu.encode())
    except OSError:
        pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionClosed("the peer closed the connection")
        out += chunk
    return bytes(out)
