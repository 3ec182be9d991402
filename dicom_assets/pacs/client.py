"""The PACS client: C-ECHO, C-FIND, C-MOVE and C-GET over pynetdicom, within the request budget.

A :class:`PacsSession` keeps one association open for many requests (an association costs a
request of the budget too) and reopens it when the PACS dropped it. Every request it sends first
takes a token from the :class:`~dicom_assets.pacs.budget.RequestBudget`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicom_assets.config import PacsSettings
from dicom_assets.pacs.budget import RequestBudget, UnlimitedBudget
from dicom_assets.pacs.contexts import FIND_MODELS, GET_MODELS, MOVE_MODELS, get_contexts, query_contexts
from dicom_assets.pacs.sockets import enable_tcp_nodelay

log = logging.getLogger("dicom_assets.pacs")

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
WARNING = 0xB000
MOVE_DESTINATION_UNKNOWN = 0xA801


class PacsError(RuntimeError):
    """A PACS operation failed; the message says which and why."""


class PacsUnavailable(PacsError):
    """No association could be made or it broke mid-request (refused, reset, aborted, timed out)."""


class MoveDestinationUnknown(PacsError):
    """The PACS does not know our storage SCP's AE title (status A801)."""


class PacsRequestFailed(PacsError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetrieveStatus:
    """The final answer to a C-MOVE or C-GET."""

    status: int
    completed: int | None
    failed: int | None
    warning: int | None

    @property
    def succeeded(self) -> bool:
        """Final success and no failed sub-operation (counts may be absent; disk decides the rest)."""
        return self.status == SUCCESS and not self.failed

    def describe(self) -> str:
        return (
            f"status 0x{self.status:04X}, completed {self.completed}, failed {self.failed}, "
            f"warning {self.warning}"
        )


PATIENT_KEYS = ("PatientName", "PatientSex", "PatientBirthDate")
STUDY_KEYS = (
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "PatientID",
)
SERIES_KEYS = (
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "InstitutionName",
    "SeriesDate",
    "SeriesTime",
    "NumberOfSeriesRelatedInstances",
)


def _identifier(level: str, **values: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8 so non-ASCII PatientIDs match
    ds.QueryRetrieveLevel = level
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _blank(ds: Dataset, keywords: Sequence[str]) -> Dataset:
    for keyword in keywords:
        if keyword not in ds:
            setattr(ds, keyword, "" if keyword != "NumberOfSeriesRelatedInstances" else None)
    return ds


class PacsClient:
    """Builds sessions to one PACS with the configured AE titles, timeouts and budget."""

    def __init__(self, settings: PacsSettings, budget: RequestBudget | None = None) -> None:
        enable_tcp_nodelay()
        self.settings = settings
        self.budget: RequestBudget = budget or UnlimitedBudget()

    @contextmanager
    def session(self, on_store: Callable[[Any], int] | None = None) -> Iterator["PacsSession"]:
        """A session for queries and C-MOVE, or for C-GET when ``on_store`` handles the C-STOREs."""
        session = PacsSession(self, on_store)
        try:
            yield session
        finally:
            session.close()

    def describe(self) -> str:
        s = self.settings
        return f"PACS {s.called_ae_title}@{s.host}:{s.port}"


class PacsSession:
    """One association (opened lazily, reopened when dropped) and the requests sent over it."""

    def __init__(self, client: PacsClient, on_store: Callable[[Any], int] | None) -> None:
        self.client = client
        self.settings = client.settings
        self.on_store = on_store
        self._assoc: Association | None = None
        self.requests = 0

    # -- association ---------------------------------------------------------------------------
    def _association(self) -> Association:
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        self._assoc = None
        s = self.settings
        ae = AE(ae_title=s.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.timeout_s
        ae.connection_timeout = s.timeout_s
        ae.maximum_pdu_size = 0
        kwargs: dict[str, Any] = {}
        if self.on_store is None:
            ae.requested_contexts = query_contexts()
        else:
            contexts, roles = get_contexts()
            ae.requested_contexts = contexts
            kwargs = {"ext_neg": roles, "evt_handlers": [(evt.EVT_C_STORE, self.on_store)]}
        self._take_token("associate")
        assoc = ae.associate(s.host, s.port, ae_title=s.called_ae_title, **kwargs)
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
            raise PacsUnavailable(f"cannot associate with {self.client.describe()}: {reason}")
        self._assoc = assoc
        return assoc

    def _take_token(self, what: str) -> None:
        self.client.budget.acquire(what)
        self.requests += 1

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def _dropped(self, what: str) -> PacsUnavailable:
        self._assoc = None
        return PacsUnavailable(f"{what}: {self.client.describe()} dropped the association or timed out")

    # -- requests ------------------------------------------------------------------------------
    def echo(self) -> None:
        assoc = self._association()
        self._take_token("C-ECHO")
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise self._dropped("C-ECHO")
        if status.Status != SUCCESS:
            raise PacsRequestFailed(f"C-ECHO answered 0x{status.Status:04X}", status.Status)

    def find(self, identifier: Dataset, model: str = "study") -> list[Dataset]:
        """Send one C-FIND and collect every pending identifier; raise unless the final is success."""
        assoc = self._association()
        self._take_token("C-FIND")
        results: list[Dataset] = []
        for status, found in assoc.send_c_find(identifier, FIND_MODELS[model]):
            if "Status" not in status:
                raise self._dropped(f"C-FIND at {identifier.QueryRetrieveLevel} level")
            if status.Status in PENDING:
                if found is not None:
                    results.append(found)
            elif status.Status in (SUCCESS, WARNING):
                return results
            else:
                raise PacsRequestFailed(
                    f"C-FIND at {identifier.QueryRetrieveLevel} level failed with 0x{status.Status:04X}",
                    status.Status,
                )
        raise self._dropped("C-FIND")

    def find_patients(self) -> list[Dataset]:
        return self.find(_blank(_identifier("PATIENT", PatientID=""), PATIENT_KEYS), model="patient")

    def find_studies(self, patient_id: str) -> list[Dataset]:
        """Studies of exactly this patient (a PatientID with ``*``/``?`` would also match others)."""
        found = self.find(_blank(_identifier("STUDY", PatientID=patient_id, StudyInstanceUID=""), STUDY_KEYS))
        return [ds for ds in found if str(ds.get("PatientID", "")) == patient_id]

    def find_series(self, study_uid: str) -> list[Dataset]:
        ident = _blank(_identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=""), SERIES_KEYS)
        return [ds for ds in self.find(ident) if str(ds.get("StudyInstanceUID", study_uid)) == study_uid]

    def find_instance_uids(self, study_uid: str, series_uid: str) -> list[str]:
        ident = _identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID="")
        return sorted({str(ds.SOPInstanceUID) for ds in self.find(ident) if ds.get("SOPInstanceUID")})

    def _retrieve_identifier(self, study_uid: str, series_uid: str, sop_uids: Sequence[str] | None) -> Dataset:
        if sop_uids:
            return _identifier(
                "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=list(sop_uids)
            )
        return _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)

    def move(
        self, study_uid: str, series_uid: str, destination: str, sop_uids: Sequence[str] | None = None
    ) -> RetrieveStatus:
        """C-MOVE a series (or some of its instances) to ``destination``; returns the final status."""
        assoc = self._association()
        self._take_token("C-MOVE")
        ident = self._retrieve_identifier(study_uid, series_uid, sop_uids)
        responses = assoc.send_c_move(ident, destination, MOVE_MODELS["study"])
        final = self._final_status(responses, "C-MOVE")
        if final.status == MOVE_DESTINATION_UNKNOWN:
            raise MoveDestinationUnknown(
                f"{self.client.describe()} does not know the move destination AE title "
                f"{destination!r} or cannot connect to it (status A801): register {destination!r} "
                f"on the PACS with this machine's address and receiver.port, and check that the "
                f"PACS can reach that port"
            )
        return final

    def get(self, study_uid: str, series_uid: str, sop_uids: Sequence[str] | None = None) -> RetrieveStatus:
        """C-GET a series (or some of its instances); the session's ``on_store`` receives them."""
        if self.on_store is None:
            raise PacsError("C-GET needs a session opened with an on_store handler")
        assoc = self._association()
        self._take_token("C-GET")
        ident = self._retrieve_identifier(study_uid, series_uid, sop_uids)
        return self._final_status(assoc.send_c_get(ident, GET_MODELS["study"]), "C-GET")

    def _final_status(self, responses: Any, what: str) -> RetrieveStatus:
        last: Dataset | None = None
        for status, _identifier_ in responses:
            if "Status" not in status:
                raise self._dropped(what)
            last = status
            if status.Status not in PENDING:
                break
        if last is None or last.Status in PENDING:
            raise self._dropped(what)
        return RetrieveStatus(
            status=int(last.Status),
            completed=_count(last, "NumberOfCompletedSuboperations"),
            failed=_count(last, "NumberOfFailedSuboperations"),
            warning=_count(last, "NumberOfWarningSuboperations"),
        )


def _count(status: Dataset, keyword: str) -> int | None:
    value = status.get(keyword)
    return int(value) if value not in (None, "") else None


def text(ds: Dataset, keyword: str) -> str | None:
    """A C-FIND value as plain text (None when absent or empty)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword == "PatientName":
        return str(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def integer(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
