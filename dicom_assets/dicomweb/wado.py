"""WADO-RS retrieval of one series (or of some of its instances), streamed part by part to disk.

:func:`fetch_series` sends ``GET studies/{study}/series/{series}`` (or, for the missing instances
of a partial series, one ``GET .../instances/{sop}`` each) with
``Accept: multipart/related; type="application/dicom"; transfer-syntax=*``: the ``*`` asks for
every instance as stored. Without it a server picks a syntax: Orthanc's plugin 1.7 then
transcodes to Explicit VR Little Endian (lossy JPEG decompressed, and JPEG 2000 fails with 500).

Each part is written, as its bytes come off the socket, to a hidden temp file in the series
directory (``.wado.<host>~<pid>~<random>.part``: :func:`~dicom_assets.layout.remove_stale_temps`
knows it), so memory stays flat whatever the instance size. Once the part is complete its Part 10
file meta is read (SOP Class, SOP Instance and Transfer Syntax UIDs), the start of its data set
is checked (same SOP Instance UID; the Study and Series UIDs asked for: a server's mistake must
not land in another series' directory) and the file is renamed to
:func:`~dicom_assets.layout.instance_file`, the DIMSE receiver's name. Like the receiver, the
file is not fsynced per instance (a crash leaves a temp file, never a truncated ``.dcm``).

* **Refused parts** (recorded in :attr:`WadoResult.refused`, the temp file removed, the stream
  goes on): an unsafe UID, an instance of another series, one sent twice in one answer, an
  unreadable header, a part that is not ``application/dicom``. An instance already on disk is
  counted in :attr:`WadoResult.duplicates` and not written again.
* **A bare data set** (no preamble/``DICM``/meta, as some servers send): the file meta is
  *added*, built from the part's ``Content-Type: application/dicom; transfer-syntax=...`` and
  the data set's own SOP Class/Instance UIDs (the DIMSE receiver's meta: same elements). Without
  a ``transfer-syntax`` parameter the encoding is unknown and the part is refused (guessing
  could mislabel big-endian or compressed data). A bare deflated data set is refused too.
* **Errors** (:class:`WadoError` and subclasses; each carries the :attr:`~WadoError.result`
  of what did arrive): an answer that is not multipart/related or is malformed; a stream that
  ends before its closing boundary (:class:`WadoTruncated`, a connection fault: the part in
  progress is removed, complete parts stay, so the next attempt fetches only what is missing);
  a local write failure (:class:`WadoStorageError` with its ``errno``, like the receiver's
  ``DISK_ERRNOS``). HTTP errors are :mod:`dicom_assets.dicomweb.http`'s; an instance-level 404
  is recorded in :attr:`WadoResult.not_found` and the other instances are still fetched.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx
from pydicom.filereader import read_dataset

from dicom_assets import stopping
from dicom_assets.dicomweb.http import DicomwebError, DicomwebHttp, DicomwebRequestFailed
from dicom_assets.dicomweb.multipart import (
    MultipartError,
    MultipartReader,
    TruncatedMultipart,
    content_type_params,
    related_boundary,
)
from dicom_assets.layout import UnsafeNameError, check_uid, instance_file, temp_token
from dicom_assets.pacs.errors import PacsUnavailable
from dicom_assets.pacs.receiver import file_meta
from dicom_assets.pacs.throughput import RECEIVED

log = logging.getLogger("dicom_assets.dicomweb.wado")

DICOM = "application/dicom"
IMPLICIT_VR_LE, EXPLICIT_VR_BE, DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
#: Values longer than this are skipped (seeked over), never read, while checking a data set's UIDs.
DEFER_BYTES = 4096
#: Inflated bytes of a deflated data set looked at for its UIDs (bounded: never the whole set).
DEFLATED_HEAD_BYTES = 1 << 20
COPY_CHUNK = 1 << 20
_LAST_CHECKED_TAG = 0x0020000E  # Series Instance UID: the data set is read no further
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


class WadoError(DicomwebError):
    """A WADO-RS retrieval failed; :attr:`result` is what arrived before it did."""

    result: "WadoResult | None" = None


class WadoResponseError(WadoError):
    """The answer is not a multipart/related body of DICOM parts, or it is malformed."""


class WadoTruncated(PacsUnavailable, WadoError):
    """The stream ended or broke before its closing boundary: a connection fault, retried later."""


class WadoStorageError(WadoError):
    """Writing an instance failed locally (disk full, read-only, permissions); see ``errno``."""

    def __init__(self, message: str, errno: int | None, path: Path) -> None:
        super().__init__(message)
        self.errno = errno
        self.path = path


@dataclass
class WadoResult:
    """What one :func:`fetch_series` call brought.

    ``arrived``: SOP Instance UID -> (SOP Class UID, Transfer Syntax UID as received, file size),
    the shape of :attr:`~dicom_assets.series_attempt.SeriesOutcome.arrived`. ``bytes_received``:
    part bytes read (every part, refused and duplicate ones included); ``parts``: complete parts;
    ``requests``: HTTP GETs this call sent, answered or not (the HTTP layer's retries of one GET
    are not counted here: they are in ``DicomwebHttp.requests``, the budget tokens taken).
    """

    arrived: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    bytes_received: int = 0
    parts: int = 0
    seconds: float = 0.0
    requests: int = 0
    duplicates: int = 0
    refused: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


def accept_header(transfer_syntax: str = "*") -> str:
    """The Accept header asking for DICOM parts in ``transfer_syntax`` (``*``: as stored)."""
    return f'multipart/related; type="{DICOM}"; transfer-syntax={transfer_syntax}'


def fetch_series(
    http: DicomwebHttp,
    study_uid: str,
    series_uid: str,
    directory: Path,
    sop_uids: Sequence[str] | None = None,
    transfer_syntax: str = "*",
) -> WadoResult:
    """Retrieve a series (or only ``sop_uids`` of it) into ``directory``, as the instances are stored.

    Raises :class:`WadoError` or the HTTP layer's :class:`~dicom_assets.dicomweb.http.DicomwebError`;
    either carries ``.result``, what arrived before the failure (see the module doc).
    """
    check_uid(study_uid, "StudyInstanceUID")
    check_uid(series_uid, "SeriesInstanceUID")
    base = f"studies/{study_uid}/series/{series_uid}"
    targets = [(base, None)] if sop_uids is None else [
        (f"{base}/instances/{check_uid(sop, 'SOPInstanceUID')}", sop) for sop in sop_uids
    ]  # fmt: skip
    result = WadoResult()
    series = _SeriesWriter(Path(directory), study_uid, series_uid, result)
    started = time.monotonic()
    try:
        series.make_directory()
        for path, sop in targets:
            try:
                _fetch(http, path, accept_header(transfer_syntax), series)
            except DicomwebRequestFailed as exc:
                if sop is None or exc.status != 404:
                    raise
                result.not_found.append(sop)  # gone from the server: the others still come
    except DicomwebError as exc:
        exc.result = result  # type: ignore[attr-defined]  # the HTTP layer's errors get it too
        raise
    finally:
        result.seconds = time.monotonic() - started
    return result


def _fetch(http: DicomwebHttp, path: str, accept: str, series: "_SeriesWriter") -> None:
    """One GET, its multipart body streamed into the series directory."""
    series.result.requests += 1  # sent, whatever the answer
    with http.stream(path, {"Accept": accept}) as response:
        if response.status_code == 204:
            return  # No Content: nothing of this series (or instance) to send
        try:
            reader = MultipartReader(related_boundary(response.headers.get("content-type")), series.open_part)
        except MultipartError as exc:
            raise WadoResponseError(f"GET {path}: {exc}") from exc
        try:
            for chunk in response.iter_bytes():
                reader.feed(chunk)
                stopping.PROCESS.check()  # a stop request ends a long series between chunks
            reader.close()
        except TruncatedMultipart as exc:
            raise WadoTruncated(f"GET {path}: {exc}") from exc
        except MultipartError as exc:
            raise WadoResponseError(f"GET {path}: {exc}") from exc
        except httpx.TransportError as exc:  # reset, timeout, peer closed mid-body
            raise WadoTruncated(
                f"GET {path}: the connection broke after {reader.parts} complete part(s): {type(exc).__name__}: {exc}"
            ) from exc
        except httpx.DecodingError as exc:
            raise WadoResponseError(f"GET {path}: undecodable body: {exc}") from exc
        finally:
            reader.abort()  # the part in progress, if any, is never complete: its temp file goes


class _SeriesWriter:
    """The series directory one fetch writes into, and the bookkeeping of its parts."""

    def __init__(self, directory: Path, study_uid: str, series_uid: str, result: WadoResult) -> None:
        self.directory = directory
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.result = result

    def make_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_error("cannot create the series directory", self.directory, exc) from exc

    def open_part(self, headers: dict[str, str]) -> "_PartFile":
        return _PartFile(self, headers)

    def refuse(self, reason: str) -> None:
        self.result.refused.append(reason)
        log.warning("series %s: refused a WADO-RS part: %s", self.series_uid, reason)


class _PartFile:
    """One part on its way to disk: a hidden temp file, then (checked) its instance name."""

    def __init__(self, series: _SeriesWriter, headers: dict[str, str]) -> None:
        self.series = series
        media, params = content_type_params(headers.get("content-type", DICOM))
        self.transfer_syntax = params.get("transfer-syntax")
        self.size = 0
        self.fd: int | None = None
        self.tmp = series.directory / f".wado.{temp_token()}.part"
        if media != DICOM:
            series.refuse(f"a part of Content-Type {media!r}, not {DICOM}")
            return
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _storage_error("cannot create", self.tmp, exc) from exc

    def write(self, data: memoryview) -> None:
        self.series.result.bytes_received += len(data)
        RECEIVED.add(len(data))
        if self.fd is None:
            return  # a refused part: its bytes are read and dropped
        try:
            while data:
                written = os.write(self.fd, data)
                self.size += written
                data = data[written:]
        except OSError as exc:
            self.abort()
            raise _storage_error("cannot write", self.tmp, exc) from exc

    def abort(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)

    def end(self) -> None:
        result = self.series.result
        result.parts += 1
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.close(fd)  # a late write error (NFS, quota) surfaces here
        except OSError as exc:
            self.tmp.unlink(missing_ok=True)
            raise _storage_error("cannot write", self.tmp, exc) from exc
        try:
            self._install()
        finally:
            self.tmp.unlink(missing_ok=True)  # refused, duplicate or failed: never left behind

    def _install(self) -> None:
        series, result = self.series, self.series.result
        try:
            ident = identify(self.tmp, self.transfer_syntax)
            final = instance_file(series.directory, ident.sop_instance_uid)
            _check_belongs(ident, series.study_uid, series.series_uid)
        except (_Unusable, UnsafeNameError) as exc:
            series.refuse(str(exc))
            return
        except OSError as exc:
            raise _storage_error("cannot read back", self.tmp, exc) from exc
        if ident.sop_instance_uid in result.arrived:
            series.refuse(f"SOP Instance UID {ident.sop_instance_uid} sent twice")
            return
        if final.exists():
            result.duplicates += 1
            return
        source = self.tmp
        try:
            if not ident.part10:
                source = _with_meta(self.tmp, ident)
            size = source.stat().st_size
            os.replace(source, final)
        except OSError as exc:
            source.unlink(missing_ok=True)
            raise _storage_error("cannot store", final, exc) from exc
        result.arrived[ident.sop_instance_uid] = (ident.sop_class_uid, ident.transfer_syntax_uid, size)


def _storage_error(what: str, path: Path, exc: OSError) -> WadoStorageError:
    return WadoStorageError(f"{what} {path}: {exc.strerror or exc}", exc.errno, path)


# -- what a received part is -------------------------------------------------------------------


class _Unusable(ValueError):
    """A part that cannot be stored under an instance name (the message says why)."""


@dataclass(frozen=True)
class PartIdentity:
    """The UIDs of a received part: from its file meta (Part 10) or its Content-Type (bare)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    part10: bool
    #: Study/Series/SOP Instance UIDs found at the start of the data set (absent: not seen).
    dataset_uids: dict[str, str]


def identify(path: Path, part_transfer_syntax: str | None = None) -> PartIdentity:
    """Read a received part's meta and the UIDs at the start of its data set (bounded reads).

    Raises :class:`_Unusable` when the part is neither a Part 10 file nor a bare data set whose
    transfer syntax the part's Content-Type names.
    """
    with open(path, "rb") as fp:
        head = fp.read(132)
        if len(head) == 132 and head[128:] == b"DICM":
            meta = _read_meta(fp)
            ts, sop_class, sop = (meta.get(t, "") for t in (0x00020010, 0x00020002, 0x00020003))
            if not ts:
                raise _Unusable("a Part 10 file without a Transfer Syntax UID in its meta")
            offset, part10 = fp.tell(), True
        elif not part_transfer_syntax:
            raise _Unusable(
                "a bare data set (no Part 10 preamble/meta) and no transfer-syntax parameter in its "
                "Content-Type: its encoding is unknown"
            )
        elif part_transfer_syntax == DEFLATED:
            raise _Unusable("a bare deflated data set: cannot read its UIDs to write its file meta")
        else:
            ts, sop_class, sop, offset, part10 = part_transfer_syntax, "", "", 0, False
        fp.seek(offset)
        uids = _dataset_uids(fp, ts)
    sop_class = sop_class or uids.get("SOPClassUID", "")
    sop = sop or uids.get("SOPInstanceUID", "")
    if not sop or not sop_class:
        raise _Unusable("no SOP Class/Instance UID in the file meta or at the start of the data set")
    return PartIdentity(sop_class, sop, ts, part10, uids)


def _check_belongs(ident: PartIdentity, study_uid: str, series_uid: str) -> None:
    """The data set is the instance its meta names, of the series asked for."""
    found = ident.dataset_uids
    checks = (("SOPInstanceUID", ident.sop_instance_uid), ("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid))
    for keyword, expected in checks:
        if keyword in found and found[keyword] != expected:
            raise _Unusable(f"instance {ident.sop_instance_uid}: its {keyword} is {found[keyword]!r}, expected {expected}")
    if "SeriesInstanceUID" not in found and ident.transfer_syntax_uid != DEFLATED:
        raise _Unusable(f"instance {ident.sop_instance_uid}: no Series Instance UID in its data set")


def _read_meta(fp: io.BufferedReader) -> dict[int, str]:
    """The group 0002 elements after ``DICM`` (always explicit VR little endian), as text;
    leaves ``fp`` at the first data set element."""
    meta: dict[int, str] = {}
    while True:
        start = fp.tell()
        header = fp.read(8)
        if len(header) < 8 or struct.unpack_from("<H", header)[0] != 0x0002:
            fp.seek(start)
            return meta
        tag = 0x00020000 | struct.unpack_from("<H", header, 2)[0]
        vr = header[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<L", fp.read(4))[0]
        else:
            length = struct.unpack_from("<H", header, 6)[0]
        if length > 1 << 16:
            raise _Unusable(f"a file meta element of {length} bytes: not a DICOM file meta")
        value = fp.read(length)
        if vr == b"UI":
            meta[tag] = value.decode("ascii", "replace").rstrip("\x00 ")


def _dataset_uids(fp: io.BufferedReader, transfer_syntax: str) -> dict[str, str]:
    """SOP Class/Instance, Study and Series UIDs from the start of the data set at ``fp``.

    pydicom reads elements up to (0020,000E) and seeks over every value longer than
    ``DEFER_BYTES`` (a big private blob before the UIDs costs nothing). A deflated set is
    inflated only up to ``DEFLATED_HEAD_BYTES``.
    """
    implicit, little = transfer_syntax == IMPLICIT_VR_LE, transfer_syntax != EXPLICIT_VR_BE
    source: Any = fp
    if transfer_syntax == DEFLATED:
        try:
            source = io.BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(fp.read(DEFLATED_HEAD_BYTES), DEFLATED_HEAD_BYTES))
        except zlib.error as exc:
            raise _Unusable(f"cannot inflate the deflated data set: {exc}") from exc
    try:
        ds = read_dataset(source, implicit, little, stop_when=lambda tag, vr, length: tag > _LAST_CHECKED_TAG,
                          defer_size=DEFER_BYTES)  # fmt: skip
        keywords = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        return {k: str(ds[k].value).rstrip("\x00 ") for k in keywords if k in ds and ds[k].value}
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on broken input
        if transfer_syntax == DEFLATED:
            return {}  # the inflated head ended mid-element: the meta's UIDs are used unchecked
        raise _Unusable(f"unreadable data set: {type(exc).__name__}: {exc}") from exc


def _with_meta(bare: Path, ident: PartIdentity) -> Path:
    """A new temp file: the file meta (the DIMSE receiver's) followed by the bare data set."""
    target = bare.with_name(f".wado.{temp_token()}.part")
    try:
        with open(bare, "rb") as src, open(target, "xb") as dst:
            dst.write(file_meta(ident.sop_class_uid, ident.sop_instance_uid, ident.transfer_syntax_uid))
            shutil.copyfileobj(src, dst, COPY_CHUNK)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target
