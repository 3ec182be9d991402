"""A streaming reader of ``multipart/related`` bodies (WADO-RS), part by part, never whole.

WADO-RS answers a series with one HTTP body holding every instance as a MIME part; a series
can be gigabytes and one multi-frame instance hundreds of MB. :class:`MultipartReader` is fed
the body chunk by chunk as it comes off the socket and hands each part's bytes to a
:class:`PartSink` as they arrive, so nothing but a few headers and the boundary look-behind is
ever held in memory.

The byte-level parsing is ``python-multipart``'s :class:`~python_multipart.MultipartParser`
(the streaming parser Starlette/FastAPI use). It is written for ``multipart/form-data`` but
only knows boundaries and part headers, which ``multipart/related`` (RFC 2387) shares; it keeps
at most one boundary of look-behind between chunks. Two things it does not do are done here:
it does not check the closing delimiter arrived (its ``finalize`` is a no-op), so
:meth:`MultipartReader.close` does, which is how a dropped connection is told from the end of
a series; and it allows 8 headers per part, fewer than some servers send, so the limit is raised.
A preamble other than blank lines before the first boundary is refused by it (Orthanc, dcm4chee
and the cloud services send none).
"""

from __future__ import annotations

from typing import Callable, Protocol

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

#: Part headers allowed per part (python-multipart's default is 8).
MAX_PART_HEADERS = 64


class MultipartError(ValueError):
    """The body is not a well-formed multipart body, or its Content-Type is not multipart/related."""


class TruncatedMultipart(MultipartError):
    """The body ended before the closing boundary: the connection was dropped mid-stream."""


class PartSink(Protocol):
    """Where one part's bytes go as they arrive."""

    def write(self, data: memoryview) -> None: ...

    def end(self) -> None:
        """The whole part arrived (its closing delimiter was seen)."""

    def abort(self) -> None:
        """The part will never be complete (the stream broke or parsing failed): drop it."""


def content_type_params(value: str | None) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and its parameters (names lower case, quotes removed)."""
    media, params = parse_options_header(value or "")
    return media.decode("latin-1").strip().lower(), {k.decode("latin-1").strip().lower(): v.decode("latin-1") for k, v in params.items()}


def related_boundary(content_type: str | None, expected_type: str = "application/dicom") -> bytes:
    """The boundary of a ``multipart/related`` Content-Type, checked.

    Raises :class:`MultipartError` when the media type is not multipart/related, has no
    boundary, or names a ``type`` other than ``expected_type`` (e.g. a server that answers
    ``application/dicom+json`` or an HTML error page with status 200).
    """
    media, params = content_type_params(content_type)
    if media != "multipart/related":
        raise MultipartError(f"expected a multipart/related answer, got Content-Type {content_type!r}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError(f"multipart/related answer without a boundary: {content_type!r}")
    kind = params.get("type")
    if kind is not None and kind.lower() != expected_type:
        raise MultipartError(f"multipart/related of type {kind!r}, expected {expected_type!r}")
    return boundary.encode("latin-1")


class MultipartReader:
    """Feeds a multipart body to per-part sinks as it streams in.

    ``open_part(headers)`` is called when a part's headers are complete (names lower case) and
    returns the part's :class:`PartSink`. Exceptions raised by a sink propagate out of
    :meth:`feed`; the reader then aborts the open part.
    """

    def __init__(self, boundary: bytes, open_part: Callable[[dict[str, str]], PartSink]) -> None:
        self._open_part = open_part
        self._sink: PartSink | None = None
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self.parts = 0
        self.finished = False
        self.bytes = 0
        try:
            self._parser = MultipartParser(boundary, self._callbacks(), max_header_count=MAX_PART_HEADERS)
        except Exception as exc:  # FormParserError: boundary longer than 256 bytes
            raise MultipartError(f"unusable multipart boundary: {exc}") from exc

    def _callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }  # type: ignore[return-value]

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk of the body (any size, split anywhere)."""
        if self.finished or not chunk:
            return  # the epilogue after the closing boundary is ignored (RFC 2046)
        self.bytes += len(chunk)
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            self.abort()
            raise MultipartError(f"malformed multipart body: {exc}") from exc
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """The body ended: raise :class:`TruncatedMultipart` unless the closing boundary was seen."""
        if not self.finished:
            self.abort()
            raise TruncatedMultipart(
                f"the multipart body ended before its closing boundary, after {self.parts} complete part(s) "
                f"and {self.bytes} bytes: the connection was closed mid-stream"
            )

    def abort(self) -> None:
        """Drop the part in progress (if any)."""
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.abort()

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        self._sink = self._open_part(self._headers)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None and end > start:
            self._sink.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.end()
            self.parts += 1

    def _end(self) -> None:
        self.finished = True
