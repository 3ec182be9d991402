"""WADO-RS retrieval (dicom_assets.dicomweb.wado) and its streaming multipart reader.

1. The reader on constructed ``multipart/related`` bodies: several parts, CRLF details inside
   the data, quoted boundaries, a body split into chunks at every byte position, truncation.
2. :func:`fetch_series` against a tiny HTTP server on 127.0.0.1 that serves constructed answers:
   Part 10 and bare parts, refused parts, a connection dropped mid-part, a full disk, and a
   ~100 MB multi-frame instance fetched by a fresh process whose memory is measured.
3. Against Orthanc with Debian's DICOMweb plugin: a generated cohort and the mixed set's
   compressed syntaxes arrive byte for byte as loaded, instance-level fetches of missing
   instances, and what the plugin does without ``transfer-syntax=*``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicom_assets import stopping
from dicom_assets.config_dicomweb import DicomwebSettings
from dicom_assets.dicomweb.http import DicomwebHttp, DicomwebRequestFailed
from dicom_assets.dicomweb.multipart import (
    MultipartError,
    MultipartReader,
    TruncatedMultipart,
    related_boundary,
)
from dicom_assets.dicomweb.wado import (
    WadoResponseError,
    WadoStorageError,
    WadoTruncated,
    accept_header,
    fetch_series,
)
from dicom_assets.layout import instances_on_disk
from dicom_assets.pacs.budget import UnlimitedBudget
from dicom_assets.pacs.errors import PacsUnavailable
from dicom_assets_tests.conftest import free_port, require_service
from dicom_assets_tests.orthanc import OrthancHandle, running_orthanc

BOUNDARY = "3f1c2a-boundary-of-the-test"
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


# -- constructed bodies ---------------------------------------------------------------------------


def multipart_body(parts: list[bytes], boundary: str = BOUNDARY, headers: list[dict[str, str]] | None = None,
                   preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:  # fmt: skip
    """A multipart/related body as servers write it (CRLF line ends, closing ``--``)."""
    out = bytearray(preamble)
    for i, data in enumerate(parts):
        part_headers = (headers or [{}] * len(parts))[i] or {"Content-Type": "application/dicom"}
        out += f"--{boundary}\r\n".encode()
        out += b"".join(f"{k}: {v}\r\n".encode() for k, v in part_headers.items())
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--".encode() + epilogue
    return bytes(out)


class Collected:
    """A PartSink that keeps what it is given (for the reader's tests only)."""

    def __init__(self, headers: dict[str, str], done: list["Collected"]) -> None:
        self.headers, self.data, self.ended, self.aborted = headers, bytearray(), False, False
        self._done = done

    def write(self, data: memoryview) -> None:
        self.data += data

    def end(self) -> None:
        self.ended = True
        self._done.append(self)

    def abort(self) -> None:
        self.aborted = True


def read_all(body: bytes, chunks: list[int] | None = None, boundary: str = BOUNDARY) -> tuple[list[Collected], list[Collected]]:
    """Feed ``body`` split at the offsets ``chunks``; returns (complete parts, every opened part)."""
    done: list[Collected] = []
    opened: list[Collected] = []

    def open_part(headers: dict[str, str]) -> Collected:
        opened.append(Collected(headers, done))
        return opened[-1]

    reader = MultipartReader(boundary.encode(), open_part)
    cuts = [0, *(chunks or []), len(body)]
    for start, end in zip(cuts, cuts[1:]):
        reader.feed(body[start:end])
    reader.close()
    return done, opened


TRICKY = [
    b"plain",
    b"",  # an empty part
    b"\r\n",  # a CRLF alone
    b"ends with CR\r",
    f"\r\n--{BOUNDARY[:-1]}".encode(),  # all of the delimiter but its last character
    f"x\r\n--{BOUNDARY}x no: a longer line".encode(),  # the boundary followed by more text
    f"--{BOUNDARY}\r\n no CR before it".encode(),
    b"\x00" * 300 + b"\r\r\n\n--",
    bytes(range(256)) * 3,
]


def test_reader_yields_every_part_byte_for_byte() -> None:
    body = multipart_body(TRICKY, headers=[{"Content-Type": f"application/dicom; transfer-syntax=1.2.{i}",
                                            "Content-Length": str(len(p)), "MIME-Version": "1.0"} for i, p in enumerate(TRICKY)])  # fmt: skip
    done, opened = read_all(body)
    assert [bytes(p.data) for p in done] == TRICKY
    assert done[3].headers == {"content-type": "application/dicom; transfer-syntax=1.2.3", "content-length": "13",
                               "mime-version": "1.0"}  # fmt: skip
    assert not any(p.aborted for p in opened)


def test_reader_every_split_position() -> None:
    """Two chunks split at each byte, and one byte per chunk: the same parts every time."""
    parts = [b"first\r\n--", f"\r\n--{BOUNDARY[:5]}".encode(), b"third\r"]
    body = multipart_body(parts, preamble=b"\r\n")
    for cut in range(1, len(body)):
        done, _ = read_all(body, [cut])
        assert [bytes(p.data) for p in done] == parts, cut
    done, _ = read_all(body, list(range(1, len(body))))
    assert [bytes(p.data) for p in done] == parts


def test_reader_three_chunks_everywhere_small_body() -> None:
    parts = [b"a\r\n-", b"\r"]
    body = multipart_body(parts)
    for first in range(1, len(body) - 1):
        for second in range(first + 1, len(body)):
            done, _ = read_all(body, [first, second])
            assert [bytes(p.data) for p in done] == parts, (first, second)


def test_boundary_in_quotes_and_odd_characters() -> None:
    boundary = "odd:boundary=with (specials)"
    content_type = f'multipart/related; type="application/dicom"; boundary="{boundary}"; transfer-syntax=*'
    assert related_boundary(content_type) == boundary.encode()
    done, _ = read_all(multipart_body([b"one", b"two"], boundary), boundary=boundary)
    assert [bytes(p.data) for p in done] == [b"one", b"two"]
    # Orthanc's: unquoted, 73 characters (more than RFC 2046's 70), type quoted.
    orthanc = "multipart/related; type=\"application/dicom\"; boundary=9cbbcf60-387b-4b3d-b620-63911ea41ef3-47989ae5-62f7-4216-ae3a-4f6a67044"
    assert related_boundary(orthanc).startswith(b"9cbbcf60-")
    assert related_boundary("Multipart/Related; Boundary=abc; TYPE=Application/DICOM") == b"abc"


@pytest.mark.parametrize("content_type", [
    "application/dicom+json", "text/html; charset=utf-8", None, "multipart/related; type=\"application/dicom\"",
    'multipart/related; type="application/octet-stream"; boundary=abc', "multipart/form-data; boundary=abc",
])  # fmt: skip
def test_not_a_dicom_multipart_answer(content_type: str | None) -> None:
    with pytest.raises(MultipartError):
        related_boundary(content_type)


def test_truncated_body_aborts_the_open_part() -> None:
    body = multipart_body([b"complete", b"x" * 100])
    cut = body.index(b"x" * 50) + 50
    done: list[Collected] = []
    opened: list[Collected] = []
    reader = MultipartReader(BOUNDARY.encode(), lambda h: opened.append(Collected(h, done)) or opened[-1])  # type: ignore[func-returns-value]
    reader.feed(body[:cut])
    with pytest.raises(TruncatedMultipart, match="after 1 complete part"):
        reader.close()
    assert [bytes(p.data) for p in done] == [b"complete"]
    assert opened[1].aborted and not opened[1].ended


def test_malformed_body() -> None:
    with pytest.raises(MultipartError, match="malformed"):
        read_all(b"--" + BOUNDARY.encode() + b"\r\nno colon in this header line\r\n\r\ndata\r\n--" + BOUNDARY.encode() + b"--")
    with pytest.raises(MultipartError):
        read_all(b"--not-the-boundary\r\n\r\n")


# -- instances -----------------------------------------------------------------------------------


def instance(sop_uid: str, syntax: str = ExplicitVRLittleEndian, series: str = SERIES, rows: int = 16) -> bytes:
    """A small CT instance as a Part 10 file (bytes)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
    ds.PatientID, ds.Modality = "WADO1", "CT"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(rows * rows, dtype="<u2").tobytes() if syntax != ExplicitVRBigEndian else np.arange(rows * rows, dtype=">u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 file: what follows the preamble and the file meta group."""
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00"
    return part10[144 + int.from_bytes(part10[140:144], "little") :]


def body_of(path: Path) -> bytes:
    return dataset_bytes(path.read_bytes())


# -- a local server --------------------------------------------------------------------------------

Responder = Callable[[BaseHTTPRequestHandler], None]


class LocalServer:
    """A loopback HTTP server whose answer for each path is a function writing to the socket."""

    def __init__(self) -> None:
        self.routes: dict[str, Responder] = {}
        self.seen: list[tuple[str, str]] = []
        routes, seen = self.routes, self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                seen.append((self.path, self.headers.get("Accept", "")))
                responder = routes.get(self.path.split("/dicom-web/", 1)[-1])
                if responder is None:
                    self.send_error(404)
                    return
                responder(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def multipart(self, path: str, body: bytes | Callable[[Any], None], boundary: str = BOUNDARY,
                  content_type: str | None = None, length: int | None = None) -> None:  # fmt: skip
        """Answer ``path`` with a multipart body (bytes, or a function writing it to the socket)."""

        def respond(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.send_header("Content-Type", content_type or f'multipart/related; type="application/dicom"; boundary={boundary}')
            if length is not None:
                handler.send_header("Content-Length", str(length))
            handler.end_headers()
            if callable(body):
                body(handler.wfile)
            else:
                handler.wfile.write(body)

        self.routes[path] = respond

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    local = LocalServer()
    yield local
    local.close()


def http_for(url: str) -> DicomwebHttp:
    return DicomwebHttp(DicomwebSettings(url=url), UnlimitedBudget(), wait_for_server_s=5, backoff_initial_s=0.1)


SERIES_PATH = f"studies/{STUDY}/series/{SERIES}"


def assert_no_temp(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], "temp file left"


def test_fetch_series_writes_each_instance_as_sent(server: LocalServer, tmp_path: Path) -> None:
    uids = [generate_uid() for _ in range(3)]
    files = [instance(uids[0]), instance(uids[1], ImplicitVRLittleEndian), instance(uids[2], ExplicitVRBigEndian)]
    server.multipart(SERIES_PATH, multipart_body(files))
    with http_for(server.url) as http:
        result = fetch_series(http, STUDY, SERIES, tmp_path / "s")
    assert server.seen == [(f"/dicom-web/{SERIES_PATH}", 'multipart/related; type="application/dicom"; transfer-syntax=*')]
    assert [(tmp_path / "s" / f"{u}.dcm").read_bytes() for u in uids] == files
    assert result.arrived == {
        uids[0]: (CTImageStorage, ExplicitVRLittleEndian, len(files[0])),
        uids[1]: (CTImageStorage, ImplicitVRLittleEndian, len(files[1])),
        uids[2]: (CTImageStorage, ExplicitVRBigEndian, len(files[2])),
    }
    assert (result.parts, result.requests, result.bytes_received, result.refused) == (3, 1, sum(map(len, files)), [])
    assert_no_temp(tmp_path / "s")
    again = fetch_series(http_for(server.url), STUDY, SERIES, tmp_path / "s")  # already on disk: not rewritten
    assert (again.arrived, again.duplicates) == ({}, 3)


def test_bare_data_set_gets_its_file_meta(server: LocalServer, tmp_path: Path) -> None:
    """Decided: a bare data set is stored with a file meta built from its part's transfer-syntax
    parameter and its own SOP UIDs; without the parameter it is refused (encoding unknown)."""
    with_ts, without_ts = generate_uid(), generate_uid()
    parts = [dataset_bytes(instance(with_ts, ExplicitVRBigEndian)), dataset_bytes(instance(without_ts))]
    headers = [{"Content-Type": f"application/dicom; transfer-syntax={ExplicitVRBigEndian}"}, {"Content-Type": "application/dicom"}]
    server.multipart(SERIES_PATH, multipart_body(parts, headers=headers))
    result = fetch_series(http_for(server.url), STUDY, SERIES, tmp_path)
    stored = tmp_path / f"{with_ts}.dcm"
    assert body_of(stored) == parts[0]
    ds = pydicom.dcmread(stored)
    assert (ds.file_meta.TransferSyntaxUID, ds.file_meta.MediaStorageSOPInstanceUID, ds.Rows) == (ExplicitVRBigEndian, with_ts, 16)
    assert list(result.arrived) == [with_ts] and result.arrived[with_ts][1] == ExplicitVRBigEndian
    assert len(result.refused) == 1 and "no transfer-syntax parameter" in result.refused[0]
    assert sorted(instances_on_disk(tmp_path)) == [with_ts]
    assert_no_temp(tmp_path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_refused_parts_leave_no_file(server: LocalServer, tmp_path: Path) -> None:
    good, other, twice = generate_uid(), generate_uid(), generate_uid()
    unsafe = instance("1.2.3..4")  # an unsafe UID in the meta and the data set
    parts = [instance(good), instance(other, series="1.2.3.999"), instance(twice), instance(twice), unsafe, b"not dicom at all"]
    headers: list[dict[str, str]] = [{}] * 5 + [{"Content-Type": "application/dicom"}]
    parts.append(b"{}")
    headers.append({"Content-Type": "application/json"})
    server.multipart(SERIES_PATH, multipart_body(parts, headers=headers))
    result = fetch_series(http_for(server.url), STUDY, SERIES, tmp_path)
    assert sorted(result.arrived) == sorted([good, twice])
    assert sorted(instances_on_disk(tmp_path)) == sorted([good, twice])
    reasons = "\n".join(result.refused)
    assert len(result.refused) == 5 and result.parts == 7, reasons
    for text in ("SeriesInstanceUID is '1.2.3.999'", "sent twice", "not a valid DICOM UID", "bare data set", "application/json"):
        assert text in reasons
    assert_no_temp(tmp_path)


def test_not_multipart_is_a_clear_error(server: LocalServer, tmp_path: Path) -> None:
    server.multipart(SERIES_PATH, b"[]", content_type="application/dicom+json")
    with pytest.raises(WadoResponseError, match="expected a multipart/related answer.*dicom\\+json"):
        fetch_series(http_for(server.url), STUDY, SERIES, tmp_path)


@pytest.mark.parametrize("declared_length", [False, True])
def test_dropped_connection_keeps_complete_parts(server: LocalServer, tmp_path: Path, declared_length: bool) -> None:
    """One and a half parts, then the server closes: the first stays, no temp file, and the
    error is a connection fault (retried; the next attempt asks only for what is missing)."""
    first, second = generate_uid(), generate_uid()
    whole = multipart_body([instance(first), instance(second, rows=64)])
    cut = whole.index(b"DICM", whole.index(b"DICM") + 4) + 4000
    server.multipart(SERIES_PATH, whole[:cut], length=len(whole) if declared_length else None)
    with pytest.raises(WadoTruncated, match="after 1 complete part") as caught:
        fetch_series(http_for(server.url), STUDY, SERIES, tmp_path)
    assert isinstance(caught.value, PacsUnavailable)
    assert caught.value.result is not None and list(caught.value.result.arrived) == [first]
    assert sorted(instances_on_disk(tmp_path)) == [first]
    assert_no_temp(tmp_path)


def test_stop_request_mid_stream(server: LocalServer, tmp_path: Path) -> None:
    """A stop request (SIGTERM) during a long answer ends it between chunks: the complete part
    stays, the part in progress is removed."""
    first, second = generate_uid(), generate_uid()
    whole = multipart_body([instance(first), instance(second, rows=256)])
    middle = whole.index(b"DICM", whole.index(b"DICM") + 4) + 20000

    def write(wfile: Any) -> None:
        wfile.write(whole[:middle])
        wfile.flush()
        time.sleep(0.3)  # the client has read it
        stopping.PROCESS.request("test stop")
        wfile.write(whole[middle:])

    server.multipart(SERIES_PATH, write)
    try:
        with pytest.raises(stopping.Stopped) as caught:
            fetch_series(http_for(server.url), STUDY, SERIES, tmp_path)
    finally:
        stopping.PROCESS.clear()
    assert "test stop" in str(caught.value)
    assert sorted(instances_on_disk(tmp_path)) == [first]
    assert_no_temp(tmp_path)


def test_instance_level_fetch_and_not_found(server: LocalServer, tmp_path: Path) -> None:
    a, b, gone = generate_uid(), generate_uid(), generate_uid()
    for uid in (a, b):
        server.multipart(f"{SERIES_PATH}/instances/{uid}", multipart_body([instance(uid)]))
    result = fetch_series(http_for(server.url), STUDY, SERIES, tmp_path, sop_uids=[a, gone, b])
    assert sorted(result.arrived) == sorted([a, b]) and result.not_found == [gone] and result.requests == 3


def test_disk_full_raises_with_errno(server: LocalServer, tmp_path: Path) -> None:
    """A real full disk (a 256 KB tmpfs): WadoStorageError with ENOSPC, no partial file."""
    require_service(os.geteuid() == 0 and shutil.which("mount") is not None, "root and mount(8), to mount a tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    require_service(done.returncode == 0, f"a tmpfs at {mount} ({done.stderr.strip()})")
    try:
        small, large = generate_uid(), generate_uid()
        server.multipart(SERIES_PATH, multipart_body([instance(small), instance(large, rows=512)]))
        with pytest.raises(WadoStorageError, match="No space left on device") as caught:
            fetch_series(http_for(server.url), STUDY, SERIES, mount / "s")
        assert caught.value.errno == 28 and caught.value.result is not None
        assert sorted(caught.value.result.arrived) == [small]
        assert sorted(instances_on_disk(mount / "s")) == [small]
        assert_no_temp(mount / "s")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# -- memory: a ~100 MB multi-frame instance ---------------------------------------------------------

FRAMES, FRAME_ROWS, FRAME_COLS = 100, 1024, 512
MEASURE = """
import json, resource, sys, tracemalloc
from pathlib import Path
from dicom_assets import stopping
from dicom_assets.config_dicomweb import DicomwebSettings
from dicom_assets.dicomweb.http import DicomwebHttp
from dicom_assets.dicomweb.wado import fetch_series
from dicom_assets.pacs.budget import UnlimitedBudget
url, study, series, out = sys.argv[1:5]
http = DicomwebHttp(DicomwebSettings(url=url), UnlimitedBudget())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
result = fetch_series(http, study, series, Path(out))
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_growth_kb": after - before, "traced_peak": peak, "bytes": result.bytes_received,
                  "arrived": {k: list(v) for k, v in result.arrived.items()}}))
"""

CONTROL = """from types import SimpleNamespace
body = http.client.get(url + f"/studies/{study}/series/{series}").content
result = SimpleNamespace(bytes_received=len(body), arrived={})"""


def write_large_multiframe(path: Path, sop_uid: str) -> None:
    """100 frames of 1024x512 uint16 (100 MiB of pixel data), written frame by frame."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7.3", sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = STUDY, SERIES, "WADO1", "OT"
    ds.NumberOfFrames, ds.Rows, ds.Columns = FRAMES, FRAME_ROWS, FRAME_COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, sop_uid
    header = io.BytesIO()
    ds.save_as(header, enforce_file_format=True)
    frame_bytes = FRAME_ROWS * FRAME_COLS * 2
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.write(header.getvalue())
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (FRAMES * frame_bytes).to_bytes(4, "little"))  # (7FE0,0010) OW
        for _ in range(FRAMES):
            f.write(rng.integers(0, 65535, FRAME_ROWS * FRAME_COLS, dtype="<u2").tobytes())


def test_large_multiframe_streams_with_flat_memory(server: LocalServer, tmp_path: Path) -> None:
    sop = generate_uid()
    source = tmp_path / "large.dcm"
    write_large_multiframe(source, sop)
    size = source.stat().st_size
    assert size > 100 * 2**20

    def stream_file(wfile: Any) -> None:
        wfile.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\nContent-Length: {size}\r\n\r\n".encode())
        with open(source, "rb") as f:
            shutil.copyfileobj(f, wfile, 256 * 1024)
        wfile.write(f"\r\n--{BOUNDARY}--\r\n".encode())

    server.multipart(SERIES_PATH, stream_file)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", MEASURE, server.url, STUDY, SERIES, str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=240, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"100 MiB multi-frame: RSS growth {measured['rss_growth_kb'] / 1024:.1f} MiB, "
          f"Python peak {measured['traced_peak'] / 2**20:.2f} MiB")  # fmt: skip
    assert measured["arrived"] == {sop: ["1.2.840.10008.5.1.4.1.1.7.3", ExplicitVRLittleEndian, size]}
    assert (tmp_path / "s" / f"{sop}.dcm").stat().st_size == size
    assert _same_file(source, tmp_path / "s" / f"{sop}.dcm")
    assert measured["rss_growth_kb"] < 30 * 1024
    assert measured["traced_peak"] < 8 * 2**20
    # The measurement sees buffering: the same answer read whole peaks at its size. (Only
    # tracemalloc here: the RSS high-water mark of a child may already stand above it from
    # start-up, so RSS growth can read 0 for the buffered control too.)
    control = MEASURE.replace("result = fetch_series(http, study, series, Path(out))", CONTROL)
    done = subprocess.run([sys.executable, "-c", control, server.url, STUDY, SERIES, str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=240, env=env)  # fmt: skip
    buffered = json.loads(done.stdout.strip().splitlines()[-1])
    assert buffered["traced_peak"] > 80 * 2**20, buffered


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


# -- against Orthanc with the DICOMweb plugin ------------------------------------------------------

MIXED_KINDS = ["ct-implicit-le", "ct-explicit-be", "ct-deflated-le", "ct-jpeg-baseline", "ct-jpegls-lossless",
               "ct-rle", "ct-j2k-lossless", "ct-j2k-lossy", "private-big-ob", "large-multiframe"]  # fmt: skip


@pytest.fixture(scope="module")
def orthanc_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancHandle, Any, list[Any]]]:
    """One Orthanc with the plugin for this module, holding a small cohort and the mixed set."""
    from dicom_assets.devpacs.cohort import CohortSpec, generate_cohort
    from dicom_assets.devpacs.mixed import generate_mixed_set, missing_tools

    root = tmp_path_factory.mktemp("wado-orthanc")
    require_service(not missing_tools(MIXED_KINDS), f"the mixed set's tools {missing_tools(MIXED_KINDS)}")
    cohort = generate_cohort(root / "cohort", CohortSpec(patients=1, series_per_study=2, slices_per_series=6, rows=32, columns=32, seed=13))
    mixed = generate_mixed_set(root / "mixed", kinds=MIXED_KINDS, patient_ids=("WADOMIX1",), large_bytes=6 * 2**20,
                               private_ob_bytes=2**20)  # fmt: skip
    with running_orthanc(root, free_port(), dicomweb=True) as orthanc:
        orthanc.load(root / "cohort")
        orthanc.load(root / "mixed")
        yield orthanc, cohort, mixed


def test_orthanc_cohort_series_byte_for_byte(orthanc_site: Any, tmp_path: Path) -> None:
    orthanc, cohort, _ = orthanc_site
    with http_for(orthanc.dicomweb_url) as http:
        for s in cohort.series:
            target = tmp_path / s.series_instance_uid
            result = fetch_series(http, s.study_instance_uid, s.series_instance_uid, target)
            assert sorted(result.arrived) == sorted(s.sop_instance_uids) and result.requests == 1
            for uid in s.sop_instance_uids:
                loaded = orthanc.root.parent / "cohort" / s.study_instance_uid / s.series_instance_uid / f"{uid}.dcm"
                # Orthanc's plugin sends the stored file itself: meta included, byte for byte.
                assert (target / f"{uid}.dcm").read_bytes() == loaded.read_bytes()
                assert body_of(target / f"{uid}.dcm") == body_of(loaded)
            assert_no_temp(target)


def test_orthanc_mixed_syntaxes_arrive_as_stored(orthanc_site: Any, tmp_path: Path) -> None:
    orthanc, _, mixed = orthanc_site
    by_series: dict[str, list[Any]] = {}
    for item in mixed:
        by_series.setdefault(item.series_instance_uid, []).append(item)
    with http_for(orthanc.dicomweb_url) as http:
        for series_uid, items in by_series.items():
            result = fetch_series(http, items[0].study_instance_uid, series_uid, tmp_path / series_uid)
            for item in items:
                assert result.arrived[item.sop_instance_uid] == (item.sop_class_uid, item.transfer_syntax_uid, item.size), item.kind
                assert _same_file(tmp_path / series_uid / f"{item.sop_instance_uid}.dcm", item.path), item.kind


def test_orthanc_without_star_transcodes(orthanc_site: Any, tmp_path: Path) -> None:
    """Why ``transfer-syntax=*``: asked for Explicit VR Little Endian, Orthanc's plugin 1.7
    decompresses lossy JPEG and fails on JPEG 2000 (500)."""
    orthanc, _, mixed = orthanc_site
    jpeg = next(i for i in mixed if i.kind == "ct-jpeg-baseline")
    j2k = next(i for i in mixed if i.kind == "ct-j2k-lossless")
    with http_for(orthanc.dicomweb_url) as http:
        result = fetch_series(http, jpeg.study_instance_uid, jpeg.series_instance_uid, tmp_path / "j", transfer_syntax=ExplicitVRLittleEndian)
        assert {v[1] for v in result.arrived.values()} == {ExplicitVRLittleEndian}
        with pytest.raises(DicomwebRequestFailed) as failed:
            fetch_series(http, j2k.study_instance_uid, j2k.series_instance_uid, tmp_path / "k", transfer_syntax=ExplicitVRLittleEndian)
        assert failed.value.status == 500
    assert accept_header() == 'multipart/related; type="application/dicom"; transfer-syntax=*'


def test_orthanc_instance_level_completes_a_partial_series(orthanc_site: Any, tmp_path: Path) -> None:
    orthanc, cohort, _ = orthanc_site
    s = cohort.series[0]
    target = tmp_path / "partial"
    with http_for(orthanc.dicomweb_url) as http:
        fetch_series(http, s.study_instance_uid, s.series_instance_uid, target)
        kept = {p.name: p.stat().st_ino for p in target.iterdir()}
        missing = list(s.sop_instance_uids[1:3])
        for uid in missing:
            (target / f"{uid}.dcm").unlink()
        result = fetch_series(http, s.study_instance_uid, s.series_instance_uid, target, sop_uids=missing)
    assert sorted(result.arrived) == sorted(missing) and result.requests == 2 and result.parts == 2
    assert sorted(instances_on_disk(target)) == sorted(s.sop_instance_uids)
    untouched = {p.name: p.stat().st_ino for p in target.iterdir() if p.stem not in missing}
    assert untouched == {k: v for k, v in kept.items() if k[:-4] not in missing}
    for uid in missing:
        loaded = orthanc.root.parent / "cohort" / s.study_instance_uid / s.series_instance_uid / f"{uid}.dcm"
        assert (target / f"{uid}.dcm").read_bytes() == loaded.read_bytes()


def test_orthanc_unknown_series_is_an_http_error(orthanc_site: Any, tmp_path: Path) -> None:
    orthanc, cohort, _ = orthanc_site
    with pytest.raises(DicomwebRequestFailed) as failed:
        fetch_series(http_for(orthanc.dicomweb_url), cohort.series[0].study_instance_uid, "1.2.3.4.5.6", tmp_path)
    assert failed.value.status == 404
