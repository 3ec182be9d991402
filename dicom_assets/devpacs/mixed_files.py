"""File plumbing for the mixed-content generator (:mod:`dicom_assets.devpacs.mixed`).

Running the external codecs (with a clear error when one is missing or fails), writing a file
whose one bulk element is streamed in chunks (so a multi-GB object never sits in memory),
reading back what a tool wrote, and moving finished files into the served layout.
"""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.tag import BaseTag

__all__ = [
    "TOOL_PACKAGES",
    "FileIdentity",
    "MixedToolMissing",
    "identify",
    "install_file",
    "minimal_pdf",
    "random_chunks",
    "run_tool",
    "with_file_meta",
    "write_streamed",
]

#: Every program the generator may run -> the Debian package that provides it.
TOOL_PACKAGES: dict[str, str] = {
    "dcmconv": "dcmtk",
    "dcmcjpeg": "dcmtk",
    "dcmcjpls": "dcmtk",
    "dcmcrle": "dcmtk",
    "dcmj2pnm": "dcmtk",
    "img2dcm": "dcmtk",
    "pdf2dcm": "dcmtk",
    "gdcmconv": "libgdcm-tools",
}
#: DICOM's largest explicit element length (0xFFFFFFFF means "undefined").
MAX_ELEMENT_LENGTH = 0xFFFFFFFE
CHUNK_BYTES = 4 * 1024 * 1024
TOOL_TIMEOUT_S = 300


class MixedToolMissing(RuntimeError):
    """Programs a kind needs are not installed; ``missing`` maps each to its Debian package."""

    def __init__(self, missing: dict[str, str]) -> None:
        packages = " ".join(sorted(set(missing.values())))
        super().__init__(f"missing {', '.join(sorted(missing))}: apt-get install {packages} (scripts/ensure-services.sh)")
        self.missing = dict(missing)


def run_tool(*command: str) -> None:
    """Run one codec; its stderr becomes the error message when it fails (tools print little)."""
    try:
        done = subprocess.run(command, capture_output=True, timeout=TOOL_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise MixedToolMissing({command[0]: TOOL_PACKAGES.get(command[0], "?")}) from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {output}")


def with_file_meta(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Give ``ds`` the file meta of a Part 10 file in ``transfer_syntax``; returns ``ds``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


@dataclass(frozen=True)
class FileIdentity:
    """What a written file says it is."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_instance_uid: str
    series_instance_uid: str


def identify(path: Path) -> FileIdentity:
    """Read a file's meta and UIDs; the pixel data and everything after it are not read."""
    ds = dcmread(path, stop_before_pixels=True, defer_size=1024)
    return FileIdentity(
        sop_class_uid=str(ds.file_meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
    )


def write_streamed(path: Path, ds: Dataset, tag: BaseTag, vr: str, length: int, chunks: Iterable[bytes]) -> None:
    """Write ``ds`` (Explicit VR Little Endian) plus one ``vr`` element ``tag`` of ``length``
    bytes taken from ``chunks``, without holding the element in memory.

    pydicom writes the elements before ``tag`` (with the file meta), then the element's header
    and the chunks go straight to the file, then pydicom writes the elements after it.
    """
    if vr not in ("OB", "OW") or length % 2 or not 0 < length <= MAX_ELEMENT_LENGTH:
        raise ValueError(f"an {vr} element of {length} bytes cannot be written (OB/OW, even, <= {MAX_ELEMENT_LENGTH})")
    head, tail = Dataset(), Dataset()
    for elem in ds:
        if elem.tag != tag:
            (head if elem.tag < tag else tail)[elem.tag] = elem
    head.file_meta = ds.file_meta
    with open(path, "wb") as fp:
        head.save_as(fp, enforce_file_format=True)
        fp.write(struct.pack("<HH2sHI", tag.group, tag.element, vr.encode(), 0, length))
        written = 0
        for chunk in chunks:
            fp.write(chunk)
            written += len(chunk)
        if written != length:
            raise RuntimeError(f"{path.name}: {written} bytes of data for a {length}-byte element")
        if len(tail):
            dcmwrite(fp, tail, implicit_vr=False, little_endian=True)


def random_chunks(rng: np.random.Generator, length: int, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``length`` pseudo-random (incompressible) bytes in chunks of at most ``chunk``."""
    remaining = length
    while remaining > 0:
        size = min(chunk, remaining)
        yield rng.bytes(size)
        remaining -= size


def minimal_pdf(text: str) -> bytes:
    """A valid one-page PDF 1.4 showing ``text`` (ASCII) in Helvetica, with a correct xref table."""
    safe = text.encode("ascii", "replace").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
    stream = b"BT /F1 14 Tf 72 770 Td (" + safe + b") Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def install_file(made: Path, root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Move a finished file to ``root/<study>/<series>/<sop>.dcm`` via a hidden name (a PACS
    scanning ``root`` meanwhile never reads a half-moved file); returns the final path."""
    final = root / study_uid / series_uid / f"{sop_uid}.dcm"
    final.parent.mkdir(parents=True, exist_ok=True)
    hidden = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.part")
    os.replace(made, hidden)
    os.replace(hidden, final)
    return final
