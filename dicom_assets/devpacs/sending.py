"""How instances leave the bundled PACS: C-STORE sub-operations of C-MOVE and C-GET.

* **As stored** whenever the peer accepted a presentation context for the instance's (SOP class,
  stored transfer syntax): the C-STORE streams the file's own bytes after its file meta
  (pynetdicom's ``STORE_SEND_CHUNKED_DATASET``), never a decoded and re-encoded dataset.
  pynetdicom's Q/R service only accepts a Dataset as "what to send", so the handlers yield a
  :class:`_StoredFile` stand-in and the sending association swaps it for what
  :meth:`SendPolicy.outgoing` says (see :func:`_send_files_as_stored`).
* For C-MOVE we propose the contexts (:func:`_move_contexts`): one per (class, stored syntax)
  the instances need, so a storage SCP that accepts them gets everything as stored. For C-GET
  the requester proposes and we accept one syntax per context, Explicit VR Little Endian first
  when offered (server.py): a requester offering one context per (class, syntax) gets every
  instance as stored; one offering a single context per class listing many syntaxes gets
  Explicit VR Little Endian for every class, and what is stored otherwise follows the rules below.
* **Not accepted as stored** (:meth:`SendPolicy.outgoing`): what the peer accepted for the
  class decides. A converted dataset goes in an accepted uncompressed Little Endian context
  (pynetdicom picks it: the dataset's own syntax if accepted, else the first such context; with
  the usual C-GET proposal that is the one Explicit VR Little Endian context).

  - stored in uncompressed Little Endian (implicit, explicit, deflated): the dataset is read and
    pynetdicom re-encodes its elements. Lossless; pixel data untouched. In both modes.
  - otherwise, by default, the sub-operation fails (no transcoding): the C-STORE is not sent,
    pynetdicom counts a failed sub-operation and goes on with the next instance; the final
    status is 0xB000 (some failed) or 0xA702 (all failed) with FailedSOPInstanceUIDList.
  - with ``transcode_to_explicit=True`` (a PACS that transcodes, like Orthanc with
    ``AllowTranscoding``): the pixels are decoded (:mod:`dicom_assets.devpacs.transcode`: lossy
    JPEG arrives decompressed, big endian swapped). What cannot be decoded (JPEG 2000 without a
    decoder) ends a C-GET as Orthanc 1.10 does: no C-STORE for it, no further sub-operation, and
    a final 0xC000 (here with an ErrorComment "Cannot transcode from <syntax>"; Orthanc only logs
    it, and counts 1 failed where pynetdicom counts it and every remaining one). A C-MOVE
    sub-operation that cannot be transcoded fails alone (as by default). For C-MOVE the PACS
    also proposes an Explicit VR Little Endian context per class, to fall back on.
  - no uncompressed Little Endian context accepted for the class (none at all, or only other
    compressed syntaxes: we never compress): the sub-operation fails the same way.

The C-MOVE sub-association's reactor is also kept from stealing C-STORE responses
(:func:`_responses_only_to_the_sender`).

Split out of :mod:`dicom_assets.devpacs.server`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_assets.devpacs.catalog import _Instance
from dicom_assets.devpacs.transcode import (
    UNCOMPRESSED_LITTLE_ENDIAN,
    CannotTranscode,
    decode_to_native,
)

LOGGER = logging.getLogger("dicom_assets.devpacs")
MAX_CONTEXTS = 128
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: The final status of a C-GET ended by an instance that cannot be transcoded (Orthanc's).
UNABLE_TO_PROCESS = 0xC000
#: Which accepted syntax a converted instance goes in, best first.
_TARGET_PREFERENCE = (EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99")


class CannotSend(Exception):
    """The instance cannot go out on this association; the message says why (for the log and
    the ErrorComment); ``short`` fits an ErrorComment (LO, 64 characters)."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short[:64]


class SendPolicy:
    """Decides what a sub-operation sends for an instance: its file path (as stored) or a
    dataset pynetdicom encodes in an accepted syntax; see the module doc for the rules.

    ``read`` loads a whole file; the server passes its own so every full read of a served file
    goes through one function (a test makes it fail to prove nothing was decoded).
    """

    def __init__(self, transcode_to_explicit: bool, read: Callable[[Path], Dataset]) -> None:
        self.transcode_to_explicit = transcode_to_explicit
        self._read = read

    def outgoing(self, assoc: Association, instance: _Instance) -> Path | Dataset:
        """What to hand to pynetdicom's ``send_c_store`` for ``instance``; raises :class:`CannotSend`."""
        if _accepts_as_stored(assoc, instance):
            return instance.path
        sop_class, stored = instance.sop_class_uid, instance.transfer_syntax_uid
        target = _conversion_target(assoc, sop_class)
        if target is None:
            raise CannotSend(f"no presentation context accepted for {UID(sop_class).name}", "No presentation context for the SOP class")
        if stored in UNCOMPRESSED_LITTLE_ENDIAN and target in UNCOMPRESSED_LITTLE_ENDIAN:
            LOGGER.info("%s: stored in %s, sent re-encoded in %s", instance.path.name, UID(stored).name, UID(target).name)
            return self._read(instance.path)
        refused = f"{instance.path.name} is stored in {UID(stored).name}; the peer accepted {UID(target).name} for {UID(sop_class).name}"
        if not self.transcode_to_explicit or target not in UNCOMPRESSED_LITTLE_ENDIAN:
            raise CannotSend(f"{refused}: not transcoded", f"Not transcoded from {stored}")
        try:
            decoded = decode_to_native(instance.path, stored, self._read)
        except CannotTranscode as exc:
            raise CannotSend(f"{refused}: cannot transcode: {exc}", f"Cannot transcode from {stored}") from exc
        LOGGER.info("%s: transcoded from %s for %s", instance.path.name, UID(stored).name, UID(target).name)
        return decoded


def _conversion_target(assoc: Association, sop_class: str) -> str | None:
    """The best syntax an instance of ``sop_class`` could be converted to on ``assoc`` (None:
    no context accepted for the class). pynetdicom picks the context a dataset goes in: the one
    in the dataset's own syntax if accepted, else the first accepted uncompressed Little Endian
    one, so this decides only whether a conversion is possible, and names it in messages."""
    syntaxes = [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class and cx.as_scu]
    for preferred in _TARGET_PREFERENCE:
        if preferred in syntaxes:
            return preferred
    return syntaxes[0] if syntaxes else None


class _StoredFile(Dataset):
    """What the Q/R handlers yield as "the dataset to send": it names a file, holds no data.

    pynetdicom's C-MOVE/C-GET service requires a Dataset; the sending association (patched by
    :func:`_send_files_as_stored`) recognises this class and streams the file instead. It carries
    the SOP Instance UID so a failed sub-operation is still listed in FailedSOPInstanceUIDList.
    """

    def __init__(self, instance: _Instance) -> None:
        super().__init__()
        object.__setattr__(self, "devpacs_instance", instance)
        self.SOPClassUID = instance.sop_class_uid
        self.SOPInstanceUID = instance.ids[3]
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = instance.transfer_syntax_uid

    @property
    def instance(self) -> _Instance:
        return object.__getattribute__(self, "devpacs_instance")  # type: ignore[no-any-return]

    @property
    def prepared(self) -> Path | Dataset | None:
        """What to send, when the C-GET handler decided it before the sub-operation (else None)."""
        return object.__getattribute__(self, "__dict__").get("devpacs_prepared")

    def prepare(self, outgoing: Path | Dataset) -> None:
        object.__setattr__(self, "devpacs_prepared", outgoing)


def _accepts_as_stored(assoc: Association, instance: _Instance) -> bool:
    """Whether the peer accepted the file's own (SOP class, transfer syntax) with us as SCU."""
    return any(
        cx.abstract_syntax == instance.sop_class_uid and cx.transfer_syntax[0] == instance.transfer_syntax_uid and cx.as_scu
        for cx in assoc.accepted_contexts
    )



def _send_files_as_stored(assoc: Association, policy: SendPolicy) -> None:
    """Make ``assoc.send_c_store`` send a :class:`_StoredFile` as ``policy`` says (idempotent).

    With ``STORE_SEND_CHUNKED_DATASET`` on, pynetdicom streams a path's bytes after the file meta
    unchanged; a Dataset it encodes in the accepted syntax. :class:`CannotSend` propagates:
    pynetdicom counts the sub-operation as failed and logs the reason.
    """
    if getattr(assoc, "_devpacs_sends_files", False):
        return
    original = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if isinstance(dataset, _StoredFile):
            outgoing = dataset.prepared
            if outgoing is None:
                outgoing = policy.outgoing(assoc, dataset.instance)
            return original(outgoing, *args, **kwargs)
        return original(dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store  # type: ignore[method-assign]
    assoc._devpacs_sends_files = True  # type: ignore[attr-defined]


def _responses_only_to_the_sender(assoc: Association) -> None:
    """Keep ``assoc``'s reactor thread from taking the responses its ``send_c_store`` waits for.

    pynetdicom's reactor polls the DIMSE queue (``get_msg(block=False)``) to serve requests
    from the peer; ``send_c_store`` pauses it first (``_reactor_checkpoint.clear()``, then waits
    for ``_is_paused``). That handshake has a hole: ``_is_paused`` is still True just after the
    reactor passed its checkpoint, so a sender pausing it then goes ahead, and the reactor's
    next poll can take the C-STORE-RSP (logged "Received unexpected C-STORE service message").
    The sub-operation then waits the whole DIMSE timeout (30 s), sending nothing on the
    C-MOVE's association meanwhile: the requestor sees a C-MOVE stall for its own timeout.

    A C-MOVE sub-association only sends C-STOREs; the storage SCP at the other end sends
    responses, never requests. So its reactor has nothing to poll for: every message that
    comes back belongs to the ``send_c_store`` waiting for it (a blocking ``get_msg``).
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return take(block) if block else (None, None)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


class _DevPacsAE(AE):
    """An AE whose outgoing associations (C-MOVE sub-operations) send files as stored, and
    whose reactor threads leave the C-STORE responses to the sender (see
    :func:`_responses_only_to_the_sender`)."""

    def associate(self, *args: Any, **kwargs: Any) -> Association:  # type: ignore[override]
        assoc = super().associate(*args, **kwargs)
        _responses_only_to_the_sender(assoc)
        _send_files_as_stored(assoc)
        return assoc

class _DevPacsAE(AE):
    """An AE whose outgoing associations (C-MOVE sub-operations) send files as ``policy`` says
    (as stored when accepted), and whose reactor threads leave the C-STORE responses to the
    sender (see :func:`_responses_only_to_the_sender`)."""

    def __init__(self, *args: Any, policy: SendPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def associate(self, *args: Any, **kwargs: Any) -> Association:  # type: ignore[override]
        assoc = super().associate(*args, **kwargs)
        _responses_only_to_the_sender(assoc)
        _send_files_as_stored(assoc, self.policy)
        return assoc


def _move_contexts(instances: Sequence[_Instance], fallback_to_explicit: bool = False) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) the files need, so each goes out as stored;
    with ``fallback_to_explicit`` also one Explicit VR Little Endian context per class, for a
    storage SCP that refuses a stored syntax (those instances are then transcoded)."""
    pairs = list(dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in instances))
    if fallback_to_explicit:
        classes = dict.fromkeys(sop_class for sop_class, _ in pairs)
        pairs += [(c, EXPLICIT_VR_LITTLE_ENDIAN) for c in classes if (c, EXPLICIT_VR_LITTLE_ENDIAN) not in pairs]
    if len(pairs) > MAX_CONTEXTS:
        LOGGER.warning("C-MOVE needs %d presentation contexts; only %d can be proposed", len(pairs), MAX_CONTEXTS)
    return [build_context(sop_class, syntax) for sop_class, syntax in pairs[:MAX_CONTEXTS]] or [build_context(Verification)]
