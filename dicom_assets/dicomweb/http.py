"""The HTTP layer of DICOMweb: one pooled ``httpx.Client``, the request budget, retries, clear errors.

Every HTTP request, retries included, first takes one token of the shared
:class:`~dicom_assets.pacs.budget.RequestBudget`, so QIDO-RS and WADO-RS requests count against
the PACS's budget exactly like DIMSE requests do (the site's limit is on requests, whatever
their protocol).

Faults are handled the way :mod:`dicom_assets.pacs.faults` handles DIMSE faults:

* 429 Too Many Requests, 503 Service Unavailable (and 502/504 from a gateway in front of the
  server) and connection faults (refused, reset, timed out) are waited out with the capped
  exponential backoff, honouring ``Retry-After`` (seconds or an HTTP date), for as long as the
  outage lasts less than ``wait_for_server_s``; then :class:`DicomwebUnavailable`. An answered
  request ends the outage (:class:`~dicom_assets.pacs.faults.OutageClock`). A reset connection
  or a 429 is also reported to the budget (``note_reset``), which lowers the shared rate.
* 401/403 raise :class:`DicomwebAuthError` at once (retrying a wrong password only locks the
  account), naming the URL and the auth mode, never the credential.
* Any other 4xx/5xx raises :class:`DicomwebRequestFailed` with the status and the server's short
  message; so does a redirect (not followed: a login page must not pass for an answer).

The errors subclass the DIMSE client's (:mod:`dicom_assets.pacs.errors`), so the pipeline's
handling (stop the run without using attempts when the server is unreachable) applies as is.
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping

import httpx

from dicom_assets import stopping
from dicom_assets.config_dicomweb import DicomwebSettings
from dicom_assets.pacs.budget import RequestBudget
from dicom_assets.pacs.errors import PacsError, PacsRequestFailed, PacsUnreachable
from dicom_assets.pacs.faults import Backoff, OutageClock, RequestGate

log = logging.getLogger("dicom_assets.dicomweb")

#: Statuses that say "not now": waited out like a connection fault.
RETRY_STATUSES = {429: "429 Too Many Requests", 502: "502 Bad Gateway", 503: "503 Service Unavailable",
                  504: "504 Gateway Timeout"}  # fmt: skip
DICOM_JSON = "application/dicom+json"
#: Longest server message quoted in an error.
MESSAGE_CHARS = 300


class DicomwebError(PacsError):
    """A DICOMweb operation failed; the message says which and why."""


class DicomwebUnavailable(PacsUnreachable, DicomwebError):
    """The server could not be reached, or kept answering 429/503, for ``wait_for_server_s``."""


class DicomwebAuthError(DicomwebError):
    """401/403: the credentials are missing, wrong or lack the rights (never retried)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class DicomwebRequestFailed(PacsRequestFailed, DicomwebError):
    """Any other error answer; ``status`` is the HTTP status, ``server_message`` what it said."""

    def __init__(self, message: str, status: int, server_message: str = "") -> None:
        super().__init__(message, status)
        self.server_message = server_message


class _BearerAuth(httpx.Auth):
    """``Authorization: Bearer <token>`` on every request (the token stays out of reprs)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "_BearerAuth(***)"

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


def _auth(settings: DicomwebSettings) -> httpx.Auth | None:
    """The httpx auth of the settings; the secrets are read here and nowhere else."""
    if settings.auth == "basic" and settings.username and settings.password:
        return httpx.BasicAuth(settings.username.get_secret_value(), settings.password.get_secret_value())
    if settings.auth == "bearer" and settings.token:
        return _BearerAuth(settings.token.get_secret_value())
    return None


def retry_after_s(value: str | None, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - now()).total_seconds())


def server_message(body: str) -> str:
    """The server's short explanation of an error answer (its body), on one line."""
    text = body.strip()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("Message", "message", "Details", "error", "detail") if body.get(k)]
        text = "; ".join(dict.fromkeys(parts)) or text
    text = " ".join(text.split())
    return text[:MESSAGE_CHARS] + ("..." if len(text) > MESSAGE_CHARS else "")


def describe_fault(exc: httpx.TransportError) -> str:
    """A connection fault in words: refused, reset, timed out ..."""
    text = str(exc).lower()
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if "refused" in text:
        return "connection refused"
    if "reset" in text:
        return "connection reset"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"connection closed by the server ({exc})"
    return str(exc) or type(exc).__name__


class DicomwebHttp:
    """The HTTP client of one DICOMweb server, shared by the QIDO and WADO code and their threads.

    ``get_json`` resolves paths against ``settings.qido_root``, ``stream`` against
    ``settings.wado_root``; an absolute URL is used as it is. ``requests`` counts every HTTP
    request sent (retries included), i.e. the budget tokens taken.
    """

    def __init__(
        self,
        settings: DicomwebSettings,
        budget: RequestBudget,
        backoff_initial_s: float = 2.0,
        backoff_max_s: float = 120.0,
        wait_for_server_s: float = 600.0,
        *,
        gate: RequestGate | None = None,
        max_connections: int = 8,
        sleep: Callable[[float], None] = stopping.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.budget = budget
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.wait_for_server_s = wait_for_server_s
        self.outage = OutageClock(wait_for_server_s)
        self.gate = gate
        self._sleep = sleep
        self._lock = threading.Lock()
        self._thread = threading.local()  # this thread's requests: one session's share of a shared client
        self.requests = 0
        self.client = httpx.Client(
            auth=_auth(settings),
            timeout=httpx.Timeout(settings.timeout_s),
            verify=settings.verify_tls,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,  # a redirect to a login page must not look like an answer
            transport=transport,
        )

    def __enter__(self) -> "DicomwebHttp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self.client.close()

    def thread_requests(self) -> int:
        """The requests the calling thread sent through this client (retries included)."""
        return getattr(self._thread, "requests", 0)

    def describe(self) -> str:
        return f"the DICOMweb server {self.settings.describe()}"

    # -- public requests -------------------------------------------------------------------------
    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """A QIDO-RS GET: the DICOM JSON array the server answered (204 No Content: ``[]``)."""
        url = self._url(self.settings.qido_root, path)
        response = self._send("GET", url, "QIDO", params=params, headers={"Accept": DICOM_JSON})
        if response.status_code == 204 or not response.content.strip():
            return []
        try:
            body = response.json()
        except ValueError as exc:
            raise self._failed(response, url, "the answer is not JSON") from exc
        if not isinstance(body, list):
            raise self._failed(response, url, "the answer is not a JSON array of datasets")
        return body

    @contextmanager
    def stream(self, path: str, headers: Mapping[str, str] | None = None,
               params: Mapping[str, Any] | None = None) -> Iterator[httpx.Response]:  # fmt: skip
        """A WADO-RS GET whose body is not read: yields the response (status 2xx, headers read)
        for the caller to stream (``iter_bytes``/``iter_raw``); closed on exit. Faults before the
        headers arrive are retried like any request; faults while streaming are the caller's."""
        url = self._url(self.settings.wado_root, path)
        response = self._send("GET", url, "WADO", params=params, headers=dict(headers or {}), stream=True)
        try:
            yield response
        finally:
            response.close()

    # -- the retry loop --------------------------------------------------------------------------
    def _send(self, method: str, url: str, kind: str, *, params: Mapping[str, Any] | None,
              headers: Mapping[str, str], stream: bool = False) -> httpx.Response:  # fmt: skip
        """Send until answered: waits out 429/503 and connection faults, raises on the rest."""
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        request = self.client.build_request(method, url, params=params, headers=headers)
        while True:
            response, fault = self._attempt(request, kind, stream)
            if response is not None and response.status_code not in RETRY_STATUSES:
                self.outage.progress()
                if response.status_code >= 300:
                    raise self._error(response, url, _error_body(response, stream))
                return response
            delay: float | None = None
            if (response is None and fault == "connection reset") or (response is not None and response.status_code == 429):
                self._note_reset()
            if response is not None:
                fault = f"answered {RETRY_STATUSES[response.status_code]}"
                delay = retry_after_s(response.headers.get("Retry-After"))
                response.close()
            self._wait_out(fault, backoff, delay, request)

    def _attempt(self, request: httpx.Request, kind: str, stream: bool) -> tuple[httpx.Response | None, str]:
        """One request (one budget token): the response, or None and the connection fault."""
        if self.gate is not None:
            self.gate.wait()
        stopping.PROCESS.check()
        self.budget.acquire(f"{kind} {request.method} {request.url.path}"[:200])
        with self._lock:
            self.requests += 1
        self._thread.requests = self.thread_requests() + 1
        try:
            response = self.client.send(request, stream=stream)
        except httpx.TransportError as exc:
            if isinstance(exc, (httpx.UnsupportedProtocol, httpx.ProxyError)):
                raise DicomwebError(f"cannot send to {self.describe()}: {exc}") from exc
            return None, describe_fault(exc)
        return response, ""

    def _note_reset(self) -> None:
        """A reset or a 429: tell the shared budget, which slows every worker down (when it adapts
        its rate), as the DIMSE client does on a reset association."""
        note = getattr(self.budget, "note_reset", None)
        if note is not None:
            note()

    def _wait_out(self, fault: str, backoff: Backoff, retry_after: float | None, request: httpx.Request) -> None:
        """Sleep before the next try, or raise DicomwebUnavailable once the outage is too long."""
        self.outage.fault()
        remaining = self.outage.remaining()
        if remaining <= 0:
            raise DicomwebUnavailable(
                f"cannot reach {self.describe()}: {fault} (for {self.wait_for_server_s:g} s); "
                "no attempt was used, run again when the server is back"
            )
        delay = max(backoff.next(), retry_after or 0.0)
        delay = min(delay, remaining)
        if self.gate is not None:
            self.gate.hold(delay)  # every thread sharing the gate backs off
        log.warning(
            "%s %s (%s %s); next try in %.1f s (outage %.0f s of %g s)",
            self.describe(), fault, request.method, request.url.path, delay, self.outage.elapsed(), self.wait_for_server_s,
        )  # fmt: skip
        self._sleep(delay)

    # -- errors ----------------------------------------------------------------------------------
    def _error(self, response: httpx.Response, url: str, body: str) -> DicomwebError:
        status = response.status_code
        if status in (401, 403):
            return DicomwebAuthError(self._auth_advice(status, url), status)
        if status < 400:  # redirects are not followed: a login page must not pass for an answer
            where = _strip_query(response.headers.get("Location", "?"))
            return self._failed(response, url, f"redirected ({status}) to {where}: set dicomweb.url to the final URL", "")
        return self._failed(response, url, body=body)

    def _auth_advice(self, status: int, url: str) -> str:
        mode = self.settings.auth
        what = "refused the credentials (401 Unauthorized)" if status == 401 else "denied access (403 Forbidden)"
        fix = {
            "none": "the server wants authentication: set dicomweb.auth (basic or bearer) and its credentials",
            "basic": "check the user and password that dicomweb.username/dicomweb.password reference in the "
                     "environment, and the user's rights on the server",
            "bearer": "check the token that dicomweb.token references in the environment (expired? wrong audience?) "
                      "and its rights on the server",
        }[mode]  # fmt: skip
        return f"{self.describe()} {what} for {_strip_query(url)} with dicomweb.auth: {mode}; {fix}"

    def _failed(self, response: httpx.Response, url: str, why: str = "", body: str | None = None) -> DicomwebRequestFailed:
        said = server_message(response.text if body is None else body)
        reason = why or f"answered {response.status_code} {response.reason_phrase}".rstrip()
        text = f"{response.request.method} {_strip_query(url)}: {self.describe()} {reason}"
        return DicomwebRequestFailed(f"{text}: {said}" if said else text, response.status_code, said)

    @staticmethod
    def _url(root: str, path: str) -> str:
        if "://" in path:
            return path
        return f"{root.rstrip('/')}/{path.lstrip('/')}" if path else root


def _strip_query(url: str) -> str:
    """The URL without its query: query values are PatientIDs and such, kept out of errors."""
    return url.split("?", 1)[0]


def _error_body(response: httpx.Response, streamed: bool, limit: int = 4096) -> str:
    """The start of an error answer's body, for its message; a streamed answer is read only up
    to ``limit`` bytes (an error page may be large) and closed."""
    if not streamed:
        return response.text
    chunks = bytearray()
    try:
        for chunk in response.iter_bytes():
            chunks += chunk
            if len(chunks) >= limit:
                break
    except httpx.HTTPError:
        pass
    finally:
        response.close()
    return bytes(chunks[:limit]).decode(response.encoding or "utf-8", errors="replace")
