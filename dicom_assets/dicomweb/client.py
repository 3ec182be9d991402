"""The DICOMweb counterpart of :class:`~dicom_assets.pacs.client.PacsClient` (``pacs.protocol: dicomweb``).

Discovery, request resolution, series selection and retrieval use a client through a small
surface: ``settings`` (the ``pacs:`` section: retries, waits, blackout windows, workers),
``session()`` (a context manager yielding an object with the find methods, ``requests`` and
``finds``), ``outage``, ``gate``, ``backoff()``, ``sleep`` and ``describe()``.
:class:`DicomwebClient` offers the same, over one shared :class:`~dicom_assets.dicomweb.http.DicomwebHttp`
(one connection pool of at most ``pacs.max_concurrent_associations`` connections, one request
budget, one gate, one outage clock) that every session and retrieval worker uses. Its
``server_key`` (``dicomweb.budget_key()``) names the server for watermarks and budgets
(:func:`~dicom_assets.pacs.budget.server_key`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import httpx

from dicom_assets import stopping
from dicom_assets.config import PacsSettings
from dicom_assets.config_dicomweb import DicomwebSettings
from dicom_assets.dicomweb.http import DicomwebHttp
from dicom_assets.dicomweb.qido import QidoSession
from dicom_assets.pacs.budget import RequestBudget, UnlimitedBudget
from dicom_assets.pacs.faults import Backoff, RequestGate

T = TypeVar("T")


class DicomwebSession(QidoSession):
    """A :class:`QidoSession` used where a ``PacsSession`` is: ``requests`` counts the requests
    this session's thread sent since it began (the HTTP client is shared by every worker)."""

    #: HTTP has no association to lose: the HTTP layer waits out outages request by request.
    connected = True

    def __init__(self, http: DicomwebHttp, page_size: int | None = None, max_results: int | None = None) -> None:
        super().__init__(http, page_size, max_results)
        self._start = http.thread_requests()

    @property
    def requests(self) -> int:  # type: ignore[override]
        return self.http.thread_requests() - self._start

    def wait_until_reachable(self) -> None:
        """Nothing to wait for here: every request waits out connection faults and 429/503 itself
        (then :class:`~dicom_assets.dicomweb.http.DicomwebUnavailable`)."""

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``: the HTTP layer already retries what is worth retrying."""
        return fn()


class DicomwebClient:
    """Builds QIDO-RS sessions to one DICOMweb server and holds the HTTP client WADO-RS uses."""

    protocol = "dicomweb"

    def __init__(
        self,
        settings: PacsSettings,
        dicomweb: DicomwebSettings,
        budget: RequestBudget | None = None,
        gate: RequestGate | None = None,
        sleep: Callable[[float], None] = stopping.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.dicomweb = dicomweb
        self.budget: RequestBudget = budget or UnlimitedBudget()
        self.sleep = sleep
        self.gate = gate or RequestGate(settings.blackout_windows(), sleep=sleep)
        self.http = DicomwebHttp(
            dicomweb, self.budget, settings.retry_initial_s, settings.retry_max_s, settings.wait_for_pacs_s,
            gate=self.gate, max_connections=settings.max_concurrent_associations, sleep=sleep, transport=transport,
        )  # fmt: skip
        #: One outage clock for the server: the HTTP layer's, which every answered request resets.
        self.outage = self.http.outage
        #: The server's name for watermarks and the request budget.
        self.server_key = dicomweb.budget_key()

    def backoff(self) -> Backoff:
        return Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)

    def note_reset(self) -> None:
        note = getattr(self.budget, "note_reset", None)
        if note is not None:
            note()

    @contextmanager
    def session(self, sink: Any = None) -> Iterator[DicomwebSession]:
        """A QIDO-RS session (``sink`` is ignored: WADO-RS writes the files itself)."""
        session = DicomwebSession(self.http)
        try:
            yield session
        finally:
            session.close()

    def describe(self) -> str:
        return self.http.describe()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "DicomwebClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
