"""A fast ZIP writer: members deflated in parallel with ISA-L, written once, hashed as written.

``zipfile`` deflates with zlib on one core (~17 MB/s at level 6 on CT data) and seeks back to
patch each local header. Here a pool of threads reads, CRCs and deflates (ISA-L and zlib release
the GIL) and the main thread writes the results in order, so the stream never seeks and its
SHA-256 is computed on the way out. The output is an ordinary ZIP (deflate, method 8; ZIP64 when
needed; UTF-8 names) that any ``unzip`` reads; the archive step still verifies it with Python's
own ``zipfile`` reader.

Memory is bounded whatever the member size. A member of at most ``chunk_size`` bytes (8 MiB: a
CT or MR slice, most CR/DX) is read and deflated whole as one raw-deflate buffer, and its local
header carries its final CRC and sizes. A larger member (tomosynthesis, XA/US cines, whole-slide
images: single instances of 0.5-4 GB) is *streamed*: cut into ``chunk_size`` pieces that the pool
reads (``pread``) and deflates independently, each ending on a byte-aligned sync flush so the
pieces concatenate into one valid deflate stream (closed by an empty final block), with the
pieces' CRCs combined in order. Its local header cannot know the CRC and sizes before the data,
so it sets general-purpose bit 3 and a data descriptor follows the data (ZIP64 form, 8-byte
sizes, when the member may reach 4 GiB); the central directory holds the real values.

Why a data descriptor and not seeking back to patch the header: the SHA-256 is taken from the
bytes as they are written, and the archive's file object (``archive._NewFile``) is a plain
forward-only writer; patching would invalidate the hash (or force a second read of a multi-GB
zip) and would tie the writer to seekable outputs. Info-ZIP ``unzip`` and Python's ``zipfile``
both read bit-3 members through the central directory (tested, ZIP64 included).

At most ``2 * threads`` pieces (whole members or chunks) are in flight, so the whole write holds
a few chunks per thread: about ``3 * threads * chunk_size`` bytes at worst.

Compression levels keep zlib's 0-9 meaning for the user. With ISA-L (the ``isal`` package),
levels 1-2 map to ISA-L level 1, 3-5 to 2 and 6-9 to 3, whose ratio on CT matches zlib's level 6
within 1%; 0 stores. Without ``isal`` installed, zlib is used at the given level. A whole member
that does not shrink is stored; a streamed one stays deflated (ISA-L emits stored blocks for
incompressible input: +0.02%).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

try:  # ISA-L's deflate: ~15x zlib's level 6 speed at the same ratio
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - the project depends on isal; kept for robustness
    _isal = None

#: Members larger than this are streamed in pieces of this size (see the module docstring).
CHUNK_SIZE = 8 << 20

_ZIP64_LIMIT = 0xFFFFFFFF
_COUNT_LIMIT = 0xFFFF
_UTF8_FLAG = 0x800
_DESCRIPTOR_FLAG = 0x08
_FINAL_EMPTY_BLOCK = b"\x03\x00"  # a final fixed-Huffman block holding only end-of-block
_crc32_combine: Callable[[int, int, int], int] | None = getattr(_isal, "crc32_combine", None)


@dataclass(frozen=True)
class _Entry:
    """What the central directory records for one member."""

    arcname: bytes
    crc: int
    size: int
    compressed: int
    method: int
    dostime: int
    dosdate: int
    flags: int = _UTF8_FLAG


@dataclass(frozen=True)
class _Packed:
    """A member read and deflated whole."""

    entry: _Entry
    data: bytes


@dataclass(frozen=True)
class _Piece:
    """One chunk of a streamed member, deflated; ``raw`` is kept only to CRC it without combine."""

    crc: int
    size: int
    data: bytes
    raw: bytes | None


@dataclass
class _Streamed:
    """A streamed member while its pieces are written: CRC and sizes so far."""

    arcname: bytes
    method: int
    dostime: int
    dosdate: int
    zip64: bool
    fd: int
    offset: int = 0
    crc: int = 0
    size: int = 0
    compressed: int = 0

    def entry(self) -> _Entry:
        return _Entry(self.arcname, self.crc, self.size, self.compressed, self.method, self.dostime, self.dosdate,
                      _UTF8_FLAG | _DESCRIPTOR_FLAG)  # fmt: skip


def _compressor(level: int) -> Any:
    """A raw-deflate compressor for zlib ``level`` 1-9 (ISA-L when installed)."""
    if _isal is not None:
        return _isal.compressobj(1 if level <= 2 else 2 if level <= 5 else 3, _isal.DEFLATED, -15)
    return zlib.compressobj(level, zlib.DEFLATED, -15)


def _deflate(raw: bytes, level: int) -> tuple[bytes, int]:
    """Raw deflate of ``raw`` and the method to record (0 = stored when level is 0)."""
    if level == 0:
        return raw, 0
    packer = _compressor(level)
    return packer.compress(raw) + packer.flush(), 8


def _crc32(data: bytes, value: int = 0) -> int:
    return (_isal.crc32(data, value) if _isal is not None else zlib.crc32(data, value)) & 0xFFFFFFFF


def _dos_time(mtime: float) -> tuple[int, int]:
    t = time.localtime(max(mtime, 315532800))  # ZIP cannot express times before 1980
    return (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2), ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday


def _pack(path: Path, arcname: str, level: int) -> _Packed:
    raw = path.read_bytes()
    data, method = _deflate(raw, level)
    if method == 8 and len(data) >= len(raw):  # incompressible: store it
        data, method = raw, 0
    dostime, dosdate = _dos_time(path.stat().st_mtime)
    return _Packed(_Entry(arcname.encode("utf-8"), _crc32(raw), len(raw), len(data), method, dostime, dosdate), data)


def _read_at(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``; fewer only at end of file (a file that shrank)."""
    data = os.pread(fd, length, offset)
    if 0 < len(data) < length:
        parts = [data]
        while length > (got := sum(map(len, parts))) and (more := os.pread(fd, length - got, offset + got)):
            parts.append(more)
        data = b"".join(parts)
    return data


def _pack_piece(fd: int, offset: int, length: int, level: int) -> _Piece:
    """Read one chunk and deflate it up to a sync flush (byte-aligned, not final), so the
    pieces of a member concatenate into one deflate stream."""
    raw = _read_at(fd, length, offset)
    if level == 0:
        data = raw
    else:
        packer = _compressor(level)
        data = packer.compress(raw) + packer.flush(zlib.Z_SYNC_FLUSH)
    return _Piece(_crc32(raw), len(raw), data, None if _crc32_combine else raw)


def _may_need_zip64(size: int) -> bool:
    """Whether a member of ``size`` bytes could reach 4 GiB raw or deflated (deflate grows
    incompressible data by well under 1%, plus a few bytes per chunk)."""
    return size + size // 64 + (1 << 20) >= _ZIP64_LIMIT


class _HashingWriter:
    """Counts and hashes every byte on its way to the file."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.fileobj = fileobj
        self.offset = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.fileobj.write(data)
        self.sha256.update(data)
        self.offset += len(data)


def _local_header(e: _Entry, zip64: bool) -> bytes:
    """The local header; for a bit-3 member CRC and sizes are 0 (in the ZIP64 extra too)."""
    known = not e.flags & _DESCRIPTOR_FLAG
    crc, size, compressed = (e.crc, e.size, e.compressed) if known else (0, 0, 0)
    extra = struct.pack("<HHQQ", 0x0001, 16, size, compressed) if zip64 else b""
    sizes = (_ZIP64_LIMIT, _ZIP64_LIMIT) if zip64 else (compressed, size)
    header = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, e.flags, e.method, e.dostime, e.dosdate,
        crc, sizes[0], sizes[1], len(e.arcname), len(extra),
    )  # fmt: skip
    return header + e.arcname + extra


def _data_descriptor(e: _Entry, zip64: bool) -> bytes:
    """Signature, CRC and sizes after a bit-3 member's data; 8-byte sizes when its local header
    has a ZIP64 extra (that is how readers know which form follows)."""
    return struct.pack("<IIQQ" if zip64 else "<IIII", 0x08074B50, e.crc, e.compressed, e.size)


def _past_4_gib(e: _Entry) -> bool:
    """Whether the member's sizes need ZIP64 (8-byte) fields."""
    return e.size >= _ZIP64_LIMIT or e.compressed >= _ZIP64_LIMIT


def _central_entry(e: _Entry, offset: int) -> bytes:
    fields = []
    if _past_4_gib(e) or offset >= _ZIP64_LIMIT:
        fields = [e.size, e.compressed, offset]
    extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields) if fields else b""
    big = bool(fields)
    return struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | (45 if big else 20), 45 if big else 20, e.flags,
        e.method, e.dostime, e.dosdate, e.crc,
        _ZIP64_LIMIT if big else e.compressed, _ZIP64_LIMIT if big else e.size,
        len(e.arcname), len(extra), 0, 0, 0, (0o100644 << 16), _ZIP64_LIMIT if big else offset,
    ) + e.arcname + extra  # fmt: skip


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    out = b""
    if count >= _COUNT_LIMIT or cd_offset >= _ZIP64_LIMIT or cd_size >= _ZIP64_LIMIT:
        zip64_end = cd_offset + cd_size
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1)
    return out + struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, min(count, _COUNT_LIMIT), min(count, _COUNT_LIMIT),
        min(cd_size, _ZIP64_LIMIT), min(cd_offset, _ZIP64_LIMIT), 0,
    )  # fmt: skip


@dataclass
class _Step:
    """Something to write, in archive order: ``work`` (None: nothing to wait for) is awaited,
    then ``write`` gets its result."""

    work: Future[Any] | None
    write: Callable[[Any], None]


@dataclass
class _ZipStream:
    """The writing side of :func:`write_zip`: queues work on the pool, writes results in order."""

    out: _HashingWriter
    pool: ThreadPoolExecutor
    level: int
    chunk_size: int
    window: int
    central: list[bytes] = field(default_factory=list)
    pending: deque[_Step] = field(default_factory=deque)
    busy: int = 0  # steps in ``pending`` with work
    open_files: set[int] = field(default_factory=set)  # streamed members being read

    def _queue(self, work: Future[Any] | None, write: Callable[[Any], None]) -> None:
        self.pending.append(_Step(work, write))
        self.busy += work is not None
        self.drain(self.window)

    def drain(self, keep: int) -> None:
        """Write finished steps in order until at most ``keep`` steps with work are pending."""
        while self.pending and (self.busy > keep or self.pending[0].work is None):
            step = self.pending.popleft()
            if step.work is not None:
                self.busy -= 1
                step.write(step.work.result())
            else:
                step.write(None)

    def add(self, path: Path, arcname: str) -> None:
        """Queue one member: whole when it fits in a chunk, else streamed."""
        if os.stat(path).st_size <= self.chunk_size:
            self._queue(self.pool.submit(_pack, path, arcname, self.level), self._write_packed)
        else:
            self._add_streamed(path, arcname)

    def _write_packed(self, packed: _Packed) -> None:
        offset = self.out.offset
        self.out.write(_local_header(packed.entry, _past_4_gib(packed.entry)))
        self.out.write(packed.data)
        self.central.append(_central_entry(packed.entry, offset))

    def _add_streamed(self, path: Path, arcname: str) -> None:
        """Queue a bit-3 local header, one deflate job per chunk and the closing descriptor; the
        file's size when opened bounds what is read (growth later is verification's business)."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.open_files.add(fd)
        st = os.fstat(fd)
        member = _Streamed(arcname.encode("utf-8"), 8 if self.level else 0, *_dos_time(st.st_mtime),
                           zip64=_may_need_zip64(st.st_size), fd=fd)  # fmt: skip
        self._queue(None, lambda _: self._write_stream_header(member))
        for offset in range(0, st.st_size, self.chunk_size):
            length = min(self.chunk_size, st.st_size - offset)
            self._queue(self.pool.submit(_pack_piece, fd, offset, length, self.level), lambda piece: self._write_piece(member, piece))
        self._queue(None, lambda _: self._write_stream_end(member))

    def _write_stream_header(self, member: _Streamed) -> None:
        member.offset = self.out.offset
        self.out.write(_local_header(member.entry(), member.zip64))

    def _write_piece(self, member: _Streamed, piece: _Piece) -> None:
        self.out.write(piece.data)
        if _crc32_combine is not None:
            member.crc = _crc32_combine(member.crc, piece.crc, piece.size) & 0xFFFFFFFF
        else:  # pragma: no cover - isal without crc32_combine
            member.crc = _crc32(piece.raw or b"", member.crc)
        member.size += piece.size
        member.compressed += len(piece.data)

    def _write_stream_end(self, member: _Streamed) -> None:
        self.open_files.discard(member.fd)  # every piece is written: no job reads it any more
        os.close(member.fd)
        if member.method == 8:
            self.out.write(_FINAL_EMPTY_BLOCK)
            member.compressed += len(_FINAL_EMPTY_BLOCK)
        entry = member.entry()
        if not member.zip64 and _past_4_gib(entry):
            raise ValueError(f"{entry.arcname.decode('utf-8', 'replace')}: past 4 GiB without ZIP64")  # pragma: no cover
        self.out.write(_data_descriptor(entry, member.zip64))
        self.central.append(_central_entry(entry, member.offset))

    def close_files(self) -> None:
        """Close the files of streamed members left unfinished by an error (pool stopped first)."""
        while self.open_files:
            os.close(self.open_files.pop())


def write_zip(
    fileobj: BinaryIO, members: Iterable[tuple[Path, str]], level: int = 6, threads: int = 2, chunk_size: int = CHUNK_SIZE
) -> str:
    """Write ``(path, arcname)`` members as a ZIP to ``fileobj``; returns the file's SHA-256.

    ``fileobj`` only needs ``write`` (it is never sought). Members up to ``chunk_size`` bytes
    are read whole, larger ones streamed in ``chunk_size`` pieces; at most ``2 * threads``
    pieces are in memory at once, so memory does not grow with the member size.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    out = _HashingWriter(fileobj)
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="deflate")
    stream = _ZipStream(out, pool, level, chunk_size, 2 * max(1, threads))
    try:
        for path, arcname in members:
            stream.add(Path(path), arcname)
        stream.drain(0)
    finally:  # on an error (disk full, stop request): drop queued jobs, wait for running ones
        pool.shutdown(wait=True, cancel_futures=True)
        stream.close_files()
    cd_offset = out.offset
    for entry in stream.central:
        out.write(entry)
    out.write(_end_records(len(stream.central), cd_offset, out.offset - cd_offset))
    return out.sha256.hexdigest()
