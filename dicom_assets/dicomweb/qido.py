"""QIDO-RS: the find methods of the DIMSE :class:`~dicom_assets.pacs.client.PacsSession`, over HTTP.

Discovery and request resolution ask a :class:`QidoSession` exactly what they ask a
``PacsSession`` and get the same answers: pydicom ``Dataset``s (built with ``Dataset.from_json``)
carrying the same keys (``includefield=``; a key the server left out is present and empty, as in
a C-FIND answer), so nothing downstream knows the protocol.

What QIDO-RS needs beyond C-FIND:

* **Paging.** Results come ``dicomweb.page_size`` at a time (``limit``/``offset``); a short page
  is the last one. A server that caps results (``dicomweb.max_results``; the cloud services stop
  at 10,000) gets its STUDY queries split by StudyDate, then StudyTime, like the DIMSE client
  splits a C-FIND that hits ``pacs.max_find_results``.
* **Exact matching.** Servers match loosely (Orthanc 1.10's QIDO-RS ignores case: ``PAT-001``
  also finds ``pat-001``), and QIDO has no escape for ``*``/``?`` in a value, so every text key
  is checked exactly on our side: ``find_studies("PAT-001")`` returns that patient only.
* **Odd values.** Values are percent-encoded (``/`` left as is). Orthanc 1.10.1 with DICOMweb 1.7
  compares query values *without URL-decoding them*, so ``PatientID=0202-Z%C3%A9%20B%2Fx`` finds
  nothing although DIMSE finds the patient. When a value needed encoding and nothing matched, the
  query is sent once more with each such character replaced by a wildcard (``0202-Z*?B/x``),
  which needs no encoding, and the answers are checked exactly. Once that worked, the session
  sends such values in that form directly. If nothing matches either way, a warning names the
  value and the server: the patient may be there, this server just cannot be asked for it.
"""

from __future__ import annotations

import logging
import re
from datetime import date, timedelta
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicom_assets.dicomweb.http import DicomwebHttp
from dicom_assets.pacs.client import (
    PATIENT_COUNT_KEYS,
    PATIENT_KEYS,
    SERIES_KEYS,
    STUDY_COUNT_KEYS,
    STUDY_KEYS,
    InstanceInfo,
    integer,
    text,
)

log = logging.getLogger("dicom_assets.dicomweb")

#: The keys discovery reads at each level (the same as the DIMSE client's C-FIND keys).
STUDY_FIELDS = ("StudyInstanceUID", *PATIENT_KEYS, *STUDY_KEYS, *STUDY_COUNT_KEYS)
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", *SERIES_KEYS)
INSTANCE_FIELDS = ("SOPInstanceUID", "SOPClassUID", "AvailableTransferSyntaxUID")
#: Text match keys a server may match loosely, or need in wildcard form: always checked exactly.
EXACT_KEYS = ("PatientID", "AccessionNumber", "StudyInstanceUID", "StudyID")
#: Characters left as they are in a query value (besides letters, digits and ``-._~``).
RAW_SAFE = "/"
#: Fewest literal characters a wildcard form must keep (``*`` alone would list the archive).
MIN_LITERAL_CHARS = 3
_UNRESERVED = re.compile(r"[A-Za-z0-9\-._~/]")


def wildcard_form(value: str) -> str | None:
    """``value`` with every character that needs percent-encoding replaced by a wildcard: ``?``
    for an ASCII character, ``*`` for a run of non-ASCII ones (one character may be several
    UTF-8 bytes). None when too little of the value is left to be selective."""
    out: list[str] = []
    for char in value:
        if _UNRESERVED.fullmatch(char):
            out.append(char)
        elif ord(char) < 128:
            out.append("?")
        elif not out or out[-1] != "*":
            out.append("*")
    form = "".join(out)
    return form if sum(c not in "?*" for c in form) >= MIN_LITERAL_CHARS else None


def needs_encoding(value: str) -> bool:
    return quote(value, safe=RAW_SAFE) != value


def _tags(keywords: Iterable[str]) -> list[str]:
    """``includefield`` values as hex tags (every server takes tags; not every one keywords)."""
    return [f"{tag_for_keyword(k):08X}" for k in keywords]


def _dataset(item: Mapping[str, Any], keywords: Iterable[str]) -> Dataset:
    """A DICOM JSON object as a Dataset, with every asked-for key present (empty when the server
    left it out; counts None), as a C-FIND answer has them."""
    ds = Dataset.from_json({tag: el for tag, el in item.items() if "BulkDataURI" not in el})
    for keyword in keywords:
        if keyword not in ds:
            setattr(ds, keyword, None if keyword.startswith("NumberOf") else "")
    return ds


def _date_range(lo: date, hi: date) -> str:
    """A DICOM DA range; the extreme dates become open ends (``-19991231``, ``20270101-``)."""
    left = "" if lo == date.min else lo.strftime("%Y%m%d")
    right = "" if hi == date.max else hi.strftime("%Y%m%d")
    return f"{left}-{right}"


def _bounds(span: str) -> tuple[date, date]:
    """The dates of a DA match value (``20200101-20201231``, open ends, one day); any date when
    empty or unreadable."""
    left, sep, right = span.partition("-")
    right = right if sep else left

    def day(text: str, default: date) -> date:
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) == 8 else default
        except ValueError:
            return default

    return day(left.strip(), date.min), day(right.strip(), date.max)


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


class QidoSession:
    """The QIDO-RS side of one DICOMweb server: the find methods discovery uses.

    ``requests`` is the HTTP client's request count (every budget token it took, retries
    included); ``finds`` counts the QIDO queries this session sent (pages included).
    """

    def __init__(self, http: DicomwebHttp, page_size: int | None = None, max_results: int | None = None) -> None:
        self.http = http
        self.page_size = page_size or http.settings.page_size
        self.max_results = http.settings.max_results if max_results is None else max_results
        self.finds = 0
        #: False once the server proved it compares query values without URL-decoding them.
        self.server_decodes_values: bool | None = None

    @property
    def requests(self) -> int:
        return self.http.requests

    def __enter__(self) -> "QidoSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the HTTP client (and its pool) belongs to whoever made it."""

    # -- the find methods of PacsSession -------------------------------------------------------------
    def find_patients(self) -> list[Dataset]:
        """Every patient, derived from every study (QIDO-RS has no patient level): the patient's
        demographics from its studies, NumberOfPatientRelated* summed from theirs (None when a
        study's count is missing). A patient without studies is not seen (nothing to retrieve)."""
        patients: dict[str, list[Dataset]] = {}
        for study in self.find_studies_by_date(None):
            patients.setdefault(text(study, "PatientID") or "", []).append(study)
        return [_patient(pid, studies) for pid, studies in patients.items()]

    def find_studies(self, patient_id: str) -> list[Dataset]:
        """Studies of exactly this patient (checked here: servers match case-insensitively or
        with wildcards)."""
        return self.find_studies_matching(PatientID=patient_id)

    def find_studies_by_date(self, since: date | None) -> list[Dataset]:
        """Every study with a StudyDate from ``since`` on (every study when None), split by
        StudyDate when the server caps the answer. Studies without a StudyDate are only in the
        answer to the unsplit ``since=None`` query."""
        keys = {} if since is None else {"StudyDate": _date_range(since, date.max)}
        found, capped = self._studies(keys)
        if not capped:
            return found
        log.warning("%s: studies dated %s hit dicomweb.max_results=%d; splitting by StudyDate",
                    self.http.describe(), keys.get("StudyDate", "any day"), self.max_results)  # fmt: skip
        return self._split(keys, since)

    def find_studies_matching(self, **keys: str) -> list[Dataset]:
        """Studies matching these STUDY-level keys (PatientID, AccessionNumber, StudyDate range,
        ModalitiesInStudy ...), with demographics and related counts; the ID keys checked exactly,
        the rest left to the caller (as with C-FIND). Split by StudyDate when capped."""
        found, capped = self._studies(keys)
        if capped and not keys.get("StudyInstanceUID"):
            log.warning("%s: studies with %s hit dicomweb.max_results=%d; splitting by StudyDate",
                        self.http.describe(), sorted(keys), self.max_results)  # fmt: skip
            found = self._split(keys, None)
        return found

    def find_series(self, study_uid: str) -> list[Dataset]:
        """The series of one study, with the DIMSE client's SERIES-level keys."""
        found, capped = self._search(f"studies/{study_uid}/series", {}, SERIES_FIELDS)
        if capped:
            log.error("study %s: %d series = dicomweb.max_results: the list may be truncated", study_uid, len(found))
        for ds in found:
            if not ds.get("StudyInstanceUID"):
                ds.StudyInstanceUID = study_uid
        return [ds for ds in found if str(ds.StudyInstanceUID) == study_uid]

    def find_instance_uids(self, study_uid: str, series_uid: str) -> list[str]:
        return sorted({i.sop_instance_uid for i in self.find_instances(study_uid, series_uid)})

    def find_instances(self, study_uid: str, series_uid: str) -> list[InstanceInfo]:
        """The series' instances: UID, SOP class and, where the server says, the transfer syntax
        it stores each in (Available Transfer Syntax UID)."""
        path = f"studies/{study_uid}/series/{series_uid}/instances"
        found, capped = self._search(path, {}, INSTANCE_FIELDS)
        if capped:
            log.error("series %s: %d instances = dicomweb.max_results: the list may be truncated", series_uid, len(found))
        infos = {}
        for ds in found:
            if uid := text(ds, "SOPInstanceUID"):
                infos[uid] = InstanceInfo(uid, text(ds, "SOPClassUID"), text(ds, "AvailableTransferSyntaxUID"))
        return sorted(infos.values(), key=lambda i: i.sop_instance_uid)

    # -- studies: exact checks, the wildcard retry, splitting ---------------------------------------------
    def _studies(self, keys: Mapping[str, str]) -> tuple[list[Dataset], bool]:
        """STUDY-level answers that match the ID keys exactly; retried in wildcard form when a
        value needed encoding and nothing matched (see the module doc). Also: capped or not."""
        exact = _exact_check(keys)
        odd = {k: v for k, v in keys.items() if needs_encoding(v)}
        wild = {k: wildcard_form(v) for k, v in odd.items()}
        if odd and self.server_decodes_values is False and all(wild.values()):
            found, capped = self._search("studies", keys, STUDY_FIELDS, wildcards=wild)
            return [ds for ds in found if exact(ds)], capped
        found, capped = self._search("studies", keys, STUDY_FIELDS)
        matched = [ds for ds in found if exact(ds)]
        if matched or not odd:
            return matched, capped
        if all(wild.values()):
            found, capped = self._search("studies", keys, STUDY_FIELDS, wildcards=wild)
            matched = [ds for ds in found if exact(ds)]
            if matched:
                self.server_decodes_values = False
                log.info("%s matched %s only in wildcard form: it does not URL-decode query values",
                         self.http.describe(), sorted(odd))  # fmt: skip
                return matched, capped
        log.warning(
            "%s found no study with %s: these values hold characters that need URL-encoding, and "
            "some servers (Orthanc 1.10 with DICOMweb 1.7) cannot match such values over QIDO-RS; "
            "if DIMSE C-FIND or the server's own UI finds them, query them there",
            self.http.describe(), ", ".join(f"{k}={v!r}" for k, v in odd.items()),
        )  # fmt: skip
        return matched, capped

    def _split(self, keys: Mapping[str, str], since: date | None) -> list[Dataset]:
        """The STUDY query split by StudyDate (then StudyTime) until no part is capped, within the
        query's own StudyDate range; deduplicated by StudyInstanceUID. Studies without a
        StudyDate match no range, so a split query cannot find them."""
        out: dict[str, Dataset] = {}
        start, end = _bounds(keys.get("StudyDate", ""))
        start = max(start, since) if since else start
        first, last = date(1900, 1, 1), date.today() + timedelta(days=366)
        for lo, hi in ((date.min, first - timedelta(days=1)), (first, last), (last + timedelta(days=1), date.max)):
            lo, hi = max(lo, start), min(hi, end)
            if lo <= hi:
                self._split_dates(keys, lo, hi, out)
        return list(out.values())

    def _split_dates(self, keys: Mapping[str, str], lo: date, hi: date, out: dict[str, Dataset]) -> None:
        found, capped = self._studies({**keys, "StudyDate": _date_range(lo, hi)})
        if not capped:
            _collect(found, out)
        elif lo == hi:
            self._split_times(keys, lo, 0, 86399, out)
        else:
            mid = lo + (hi - lo) // 2
            self._split_dates(keys, lo, mid, out)
            self._split_dates(keys, mid + timedelta(days=1), hi, out)

    def _split_times(self, keys: Mapping[str, str], day: date, lo: int, hi: int, out: dict[str, Dataset]) -> None:
        span = {"StudyDate": _date_range(day, day), "StudyTime": f"{_hms(lo)}-{_hms(hi)}"}
        found, capped = self._studies({**keys, **span})
        if capped and hi - lo >= 60:
            mid = (lo + hi) // 2
            self._split_times(keys, day, lo, mid, out)
            self._split_times(keys, day, mid + 1, hi, out)
            return
        if capped:
            log.error("more than dicomweb.max_results studies on %s between %s and %s: results may be truncated",
                      day, _hms(lo), _hms(hi))  # fmt: skip
        _collect(found, out)

    # -- one paged query ----------------------------------------------------------------------------
    def _search(
        self, path: str, keys: Mapping[str, str], fields: tuple[str, ...], wildcards: Mapping[str, str | None] | None = None
    ) -> tuple[list[Dataset], bool]:
        """Every page of one QIDO query; capped when the answers reach ``max_results``."""
        results: list[Dataset] = []
        previous: Any = None
        while True:
            limit = self.page_size
            if self.max_results:
                limit = min(limit, self.max_results - len(results))
            query = _query(keys, fields, wildcards or {}, limit, len(results))
            self.finds += 1
            page = self.http.get_json(f"{path}?{query}")
            if page and page[0] == previous:
                log.error("%s ignores offset (the same page twice): %s answers may be incomplete", self.http.describe(), path)
                return results, False
            previous = page[0] if page else None
            results.extend(_dataset(item, fields) for item in page)
            if self.max_results and len(results) >= self.max_results:
                return results, True
            if len(page) != limit:  # short: the last page; longer: the server ignored limit
                return results, False


def _query(keys: Mapping[str, str], fields: Iterable[str], wildcards: Mapping[str, str | None], limit: int, offset: int) -> str:
    """The query string: match keys percent-encoded (``/`` kept), wildcard forms as they are
    (``?`` and ``*`` are legal in a query), ``includefield`` tags, ``limit`` and ``offset``."""
    parts = []
    for key, value in keys.items():
        if not value:
            continue  # an empty C-FIND key is a return key: includefield asks for it
        form = wildcards.get(key)
        parts.append(f"{key}={form if form else quote(value, safe=RAW_SAFE)}")
    parts += [f"includefield={tag}" for tag in _tags(fields)]
    parts += [f"limit={limit}", f"offset={offset}"]
    return "&".join(parts)


def _exact_check(keys: Mapping[str, str]) -> Callable[[Dataset], bool]:
    """A check that an answer has exactly the ID values asked for (an empty value: any)."""
    wanted = {k: v for k, v in keys.items() if k in EXACT_KEYS and v}
    return lambda ds: all((text(ds, k) or "") == v for k, v in wanted.items())


def _collect(found: list[Dataset], out: dict[str, Dataset]) -> None:
    for ds in found:
        out.setdefault(str(ds.get("StudyInstanceUID", "")), ds)


def _patient(patient_id: str, studies: list[Dataset]) -> Dataset:
    """A PATIENT-level answer built from the patient's studies."""
    ds = Dataset()
    ds.PatientID = patient_id
    for keyword in PATIENT_KEYS:
        setattr(ds, keyword, next((s.get(keyword) for s in studies if s.get(keyword)), ""))
    sums = {"NumberOfPatientRelatedStudies": len(studies)}
    for patient_key, study_key in zip(PATIENT_COUNT_KEYS[1:], STUDY_COUNT_KEYS):
        counts = [integer(s, study_key) for s in studies]
        sums[patient_key] = None if None in counts else sum(c for c in counts if c is not None)
    for keyword, value in sums.items():
        setattr(ds, keyword, value)
    return ds
