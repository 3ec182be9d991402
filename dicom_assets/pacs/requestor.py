"""Our side of an association we open to the PACS: C-ECHO, C-FIND, C-MOVE and C-GET.

pynetdicom runs two polling threads per association (its DUL reactor and the association
reactor wake every millisecond). While a C-MOVE streams a series into our storage SCP, those
threads compete for the GIL and a CPU with the receiving thread; in a C-GET they also copy every
instance into memory. Here a request is plain blocking socket I/O in the caller's thread, over
the same upper layer as the storage SCP (:mod:`dicom_assets.pacs.upper_layer`), and C-GET's
C-STOREs stream to disk through :class:`~dicom_assets.pacs.receiver.InstanceSink`.

The methods mirror pynetdicom's ``send_c_*`` (status datasets with ``Status`` and the
sub-operation counts), so :mod:`dicom_assets.pacs.client` keeps its retry and budget logic.
"""

from __future__ import annotations

import io
import itertools
import select
import socket
import struct
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_assets.pacs import upper_layer as ul

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_FIND_RQ, C_MOVE_RQ, C_ECHO_RQ = 0x0010, 0x0020, 0x0021, 0x0030
STATUS_COUNTS = {
    0x00001020: "NumberOfRemainingSuboperations",
    0x00001021: "NumberOfCompletedSuboperations",
    0x00001022: "NumberOfFailedSuboperations",
    0x00001023: "NumberOfWarningSuboperations",
}
PENDING = (0xFF00, 0xFF01)
VERIFICATION = "1.2.840.10008.1.1"


class AssociationRejected(ConnectionError):
    """The PACS rejected or aborted the association request."""


class CollectedDataset:
    """A small dataset (an identifier, a response) kept in memory as it arrives."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, piece: memoryview) -> None:
        self.data += piece

    def abort(self) -> None:
        self.data.clear()


class RequestorAssociation:
    """An established association to the PACS; one request at a time."""

    def __init__(self, assoc: ul.Association) -> None:
        self._assoc = assoc
        self._message_ids = itertools.count(1)
        self._open = True

    @property
    def is_established(self) -> bool:
        """Open, and the PACS has not aborted, released or closed it while we were idle.

        Between requests the PACS has nothing to send; anything readable (an A-ABORT, the end
        of the connection) means the association is gone, so the session opens a new one
        instead of failing its next request.
        """
        if self._open and select.select([self._assoc.sock], [], [], 0)[0]:
            self._open = False
            self._assoc.sock.close()
        return self._open

    # -- opening and closing -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        address: tuple[str, int],
        calling_ae_title: str,
        called_ae_title: str,
        contexts: list[PresentationContext],
        roles: list[SCP_SCU_RoleSelectionNegotiation] = (),  # type: ignore[assignment]
        timeout_s: float = 30.0,
    ) -> "RequestorAssociation":
        """Connect and negotiate; raises OSError (incl. AssociationRejected) when that fails."""
        sock = socket.create_connection(address, timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            proposed = [_with_id(cx, 2 * n + 1) for n, cx in enumerate(contexts)]
            sock.sendall(_associate_rq(calling_ae_title, called_ae_title, proposed, roles))
            try:
                header = ul.recv_exact(sock, 6)
            except ul.ConnectionClosed:
                raise AssociationRejected("association aborted: the PACS closed the connection without an answer") from None
            pdu_type, length = struct.unpack(">BxL", header)
            if length > ul.MAX_ASSOCIATE_PDU:
                raise ul.ProtocolError(f"association answer of {length} bytes")
            body = ul.recv_exact(sock, length)
            if pdu_type == ul.ASSOCIATE_RJ:
                rj = A_ASSOCIATE_RJ()
                rj.decode(header + body)
                raise AssociationRejected(f"association rejected ({rj.reason_str})")
            if pdu_type != ul.ASSOCIATE_AC:
                raise AssociationRejected(f"association aborted (PDU type 0x{pdu_type:02x})")
            ac = A_ASSOCIATE_AC()
            ac.decode(header + body)
            primitive = ac.to_primitive()
            their_roles = {
                item.sop_class_uid: (item.scu_role, item.scp_role)
                for item in primitive.user_information
                if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
            }
            results = negotiate_as_requestor(proposed, primitive.presentation_context_definition_results_list, their_roles)
            accepted = {cx.context_id: cx for cx in results if cx.result == 0x00}
            peer_max = next(
                (int(i.maximum_length_received or 0) for i in primitive.user_information if isinstance(i, MaximumLengthNotification)), 0
            )
        except BaseException:
            sock.close()
            raise
        return cls(ul.Association(sock, accepted, peer_max))

    def release(self) -> None:
        """A-RELEASE: ask, wait briefly for the answer, close."""
        if not self.is_established:
            return
        self._open = False
        sock = self._assoc.sock
        try:
            sock.sendall(struct.pack(">BxL", ul.RELEASE_RQ, 4) + b"\x00" * 4)
            sock.settimeout(min(sock.gettimeout() or 5.0, 5.0))
            ul.recv_exact(sock, 10)
        except OSError:
            pass
        finally:
            sock.close()

    def interrupt(self) -> None:
        """Unblock a read or write in progress from another thread (a stop request): shut the
        socket; the request then fails as a broken connection."""
        try:
            self._assoc.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def abort(self) -> None:
        if self.is_established:
            self._open = False
            self._assoc.abort()
            self._assoc.sock.close()

    # -- requests --------------------------------------------------------------------------------
    def send_c_echo(self) -> ResponseStatus:
        context_id = self._context(VERIFICATION)
        self._send(context_id, {0x00000100: C_ECHO_RQ, 0x00000800: 0x0101}, VERIFICATION)
        for _cx, command, _data in self._guarded(self._assoc.messages(_no_dataset)):
            return _status(command)
        return ResponseStatus()

    def send_c_find(self, identifier: Dataset, model: str) -> Iterator[tuple[ResponseStatus, Dataset | None]]:
        """(status, identifier) for each response, as pynetdicom's ``send_c_find``."""
        context_id = self._context(model)
        self._send(context_id, {0x00000100: C_FIND_RQ, 0x00000700: 0, 0x00000800: 0x0000}, model, identifier)
        yield from self._responses(context_id)

    def send_c_move(
        self, identifier: Dataset, destination: str, model: str, patience: Callable[[], float] | None = None
    ) -> Iterator[tuple[ResponseStatus, Dataset | None]]:
        """C-MOVE; the instances go to ``destination`` over another association.

        ``patience``: asked when no response came within the timeout, answers the seconds to
        keep waiting. Some PACS send no Pending responses, only the final one after the last
        instance; while instances keep arriving at our receiver, such a C-MOVE is working, not
        hung, and is waited for until the timeout has passed since the last instance
        (:meth:`~dicom_assets.pacs.receiver.InFlightRetrieve.patience`).
        """
        context_id = self._context(model)
        values = {0x00000100: C_MOVE_RQ, 0x00000600: ul.ae_title(destination), 0x00000700: 0, 0x00000800: 0x0000}
        self._send(context_id, values, model, identifier)
        self._assoc.reader.patience = patience
        try:
            yield from self._responses(context_id)
        finally:
            self._assoc.reader.patience = None

    def send_c_get(self, identifier: Dataset, model: str, sink: Any) -> Iterator[tuple[ResponseStatus, Dataset | None]]:
        """C-GET; the C-STOREs that come back stream to ``sink`` (an InstanceSink)."""
        context_id = self._context(model)
        self._send(context_id, {0x00000100: C_GET_RQ, 0x00000700: 0, 0x00000800: 0x0000}, model, identifier)
        yield from self._responses(context_id, sink)

    # -- plumbing --------------------------------------------------------------------------------
    def _context(self, abstract_syntax: str) -> int:
        for context_id, cx in self._assoc.contexts.items():
            if cx.abstract_syntax == abstract_syntax:
                return context_id
        raise RuntimeError(f"the PACS accepted no presentation context for {abstract_syntax}")

    def _send(self, context_id: int, values: dict[int, int | str | bytes], sop_class: str, identifier: Dataset | None = None) -> None:
        message_id = next(self._message_ids) & 0xFFFF
        command = ul.encode_command({0x00000002: sop_class, 0x00000110: message_id, **values})
        self._assoc.send_command(context_id, command)
        if identifier is not None:
            syntax = self._assoc.transfer_syntax(context_id)
            data = encode(identifier, syntax == "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2")
            if data is None:
                raise ValueError("the query identifier cannot be encoded")
            self._assoc.send_dataset(context_id, data)

    def _responses(self, context_id: int, sink: Any = None) -> Iterator[tuple[ResponseStatus, Dataset | None]]:
        def on_dataset(cx: int, command: ul.Command) -> Any:
            if command.field == C_STORE_RQ and sink is not None:
                return sink.open_instance(
                    command.uid(0x00000002), command.uid(0x00001000), self._assoc.transfer_syntax(cx), "the PACS (C-GET)"
                )  # fmt: skip
            return CollectedDataset()

        for cx, command, data in self._guarded(self._assoc.messages(on_dataset)):
            if command.field == C_STORE_RQ:
                self._answer_store(cx, command, data)
                continue
            status = _status(command)
            identifier = None
            if isinstance(data, CollectedDataset) and data.data:
                syntax = self._assoc.transfer_syntax(cx)
                identifier = decode(io.BytesIO(bytes(data.data)), syntax == "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2")
            yield status, identifier
            if int(status.get("Status", 0)) not in PENDING:
                return

    def _answer_store(self, context_id: int, command: ul.Command, data: Any) -> None:
        status = data.finish() if hasattr(data, "finish") else 0xC001
        reply = ul.encode_command({
            0x00000002: command.uid(0x00000002), 0x00000100: C_STORE_RSP, 0x00000120: command.message_id,
            0x00000800: 0x0101, 0x00000900: status, 0x00001000: command.uid(0x00001000),
        })  # fmt: skip
        self._assoc.send_command(context_id, reply)

    def _guarded(self, messages: Iterator[Any]) -> Iterator[Any]:
        """Messages; the association is gone once the peer released or the connection failed."""
        try:
            yield from messages
        except OSError:
            self.abort()
            raise
        if self._open:  # the peer sent A-RELEASE-RQ in the middle of a request
            self._open = False
            self._assoc.sock.close()
            raise ul.ConnectionClosed("the PACS released the association during a request")


def _no_dataset(context_id: int, command: ul.Command) -> CollectedDataset:
    return CollectedDataset()


class ResponseStatus(dict):  # type: ignore[type-arg]
    """A response's status fields by keyword, read like pynetdicom's status datasets
    (``status.Status``, ``"Status" in status``, ``status.get(keyword)``).

    A plain dict: a C-MOVE answers every instance with a pending response, and building a
    pydicom Dataset for each cost the receiving thread GIL time.
    """

    def __getattr__(self, keyword: str) -> Any:
        try:
            return self[keyword]
        except KeyError:
            raise AttributeError(keyword) from None


def _status(command: ul.Command) -> ResponseStatus:
    """The response's status and sub-operation counts."""
    status = ResponseStatus()
    value = command.ushort(0x00000900)
    if value is None:
        return status
    status["Status"] = value
    for tag, keyword in STATUS_COUNTS.items():
        count = command.ushort(tag)
        if count is not None:
            status[keyword] = count
    comment = command.elements.get(0x00000902)
    if comment:
        status["ErrorComment"] = comment.rstrip(b"\x00 ").decode("ascii", "replace")
    return status


def _with_id(context: PresentationContext, context_id: int) -> PresentationContext:
    copy = PresentationContext()
    copy.context_id = context_id
    copy.abstract_syntax = context.abstract_syntax
    copy.transfer_syntax = list(context.transfer_syntax)
    return copy


def _associate_rq(
    calling: str, called: str, contexts: list[PresentationContext], roles: Any
) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = ul.APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = ul.MAX_PDU_RECEIVE
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [max_length, class_uid, version, *roles]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()
