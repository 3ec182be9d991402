"""One WADO-RS attempt at one series: the DICOMweb counterpart of
:class:`~dicom_assets.series_attempt.SeriesRetriever` (same ``retrieve(series)``, same verdict).

An attempt lists the series' instances over QIDO-RS when the series is partial or its count
unknown, fetches the whole series (or, for a partial one, only its missing instances, one
instance-level GET each) with :func:`~dicom_assets.dicomweb.wado.fetch_series`, and judges from
what is on disk with the DIMSE path's rules: complete only when every expected instance is there
(with the count unknown, only a clean answer: nothing refused, nothing "not found"). An
instance the server says it stores lossless but sent lossy is removed, as for C-GET.

Errors become the outcome's ``fault`` as :mod:`dicom_assets.retrieval` expects:
a broken stream or connection (:class:`~dicom_assets.dicomweb.wado.WadoTruncated`) is
"network"; a local write failure (:class:`~dicom_assets.dicomweb.wado.WadoStorageError`) is
"storage" with its errno (a full or read-only disk stops the run); 429/502/503/504 is "busy";
any other error answer or a malformed body is "pacs". :class:`~dicom_assets.dicomweb.http.DicomwebUnavailable`
(the server stayed unreachable for ``pacs.wait_for_pacs_s``) and
:class:`~dicom_assets.dicomweb.http.DicomwebAuthError` are raised: the run stops, no attempt used.
Whatever arrived before an error is in the outcome (``new_instances``: progress).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from dicom_assets import stopping
from dicom_assets.config import Settings
from dicom_assets.dicomweb.client import DicomwebClient, DicomwebSession
from dicom_assets.dicomweb.http import RETRY_STATUSES, DicomwebAuthError, DicomwebError, DicomwebRequestFailed
from dicom_assets.dicomweb.wado import WadoResult, WadoStorageError, fetch_series
from dicom_assets.layout import instance_file, instances_on_disk, remove_stale_temps, series_dir
from dicom_assets.pacs.client import InstanceInfo, RetrieveStatus
from dicom_assets.pacs.errors import PacsUnreachable, is_connection_fault
from dicom_assets.pacs.syntaxes import transcodings
from dicom_assets.series_attempt import SeriesOutcome, SeriesRetriever, _on_disk, _stored_syntaxes
from dicom_assets.store import SeriesState

log = logging.getLogger("dicom_assets.retrieval")

_NO_STORAGE_ERROR = SimpleNamespace(last_error=None)  # what SeriesRetriever._judge reads of a C-MOVE's flight


class WadoSeriesRetriever:
    """Retrieves claimed series over WADO-RS; one per worker thread, all sharing the client's HTTP pool."""

    def __init__(self, settings: Settings, client: DicomwebClient, session: DicomwebSession) -> None:
        self.settings = settings
        self.client = client
        self.session = session
        self.download_dir = settings.paths.download_dir

    def retrieve(self, series: SeriesState) -> tuple[SeriesOutcome, int | None]:
        """One attempt at one series; returns the outcome and the expected count it learned."""
        started = time.monotonic()
        directory = series_dir(self.download_dir, series.patient_id, series.study_instance_uid, series.series_instance_uid)
        expected = series.expected_instances
        infos: list[InstanceInfo] | None = None
        result = WadoResult()
        try:
            remove_stale_temps(directory)  # instances a killed fetch was writing
            on_disk = instances_on_disk(directory)
            missing: list[str] | None = None
            if expected is None or 0 < len(on_disk) < expected:
                infos = self._instances(series)
                uids = None if infos is None else [i.sop_instance_uid for i in infos]
                cap = self.client.dicomweb.max_results
                if uids is not None and cap and len(uids) >= cap:
                    log.warning("series %s: the instance query hit dicomweb.max_results; retrieving the whole series",
                                series.series_instance_uid)  # fmt: skip
                    expected = max(expected, len(uids)) if expected is not None else None
                elif uids is not None:
                    expected = len(uids)
                    missing = [u for u in uids if u not in on_disk]
                    if on_disk and not missing:
                        return self._outcome(series, directory, started, "complete", None, result), expected
            elif len(on_disk) >= expected:
                return self._outcome(series, directory, started, "complete", None, result), expected
            result = fetch_series(
                self.client.http, series.study_instance_uid, series.series_instance_uid, directory,
                missing if on_disk and missing else None,
            )  # fmt: skip
            stored = _stored_syntaxes(infos)
            lossy = self._drop_lossy_transcodes(directory, series, result, stored)
            files = _on_disk(directory)
            unclean = len(result.refused) + len(result.not_found)
            final = RetrieveStatus(0xB000 if unclean else 0x0000, len(result.arrived), unclean, 0)
            status, error = SeriesRetriever._judge(final, len(files), expected, _NO_STORAGE_ERROR)  # type: ignore[arg-type]
            if error is not None and unclean:
                error = f"{error} (WADO-RS: {_unclean(result)})"
            if lossy:  # never complete with a lossy transcode in it
                status, error = "incomplete", lossy if error is None else f"{lossy}; {error}"
            outcome = self._outcome(series, directory, started, status, error, result, fault="pacs", answered=True, files=files)
            return dataclasses.replace(outcome, stored_syntaxes=stored), expected
        except (stopping.Stopped, PacsUnreachable, DicomwebAuthError):
            raise  # the run stops; the series is released untouched
        except WadoStorageError as exc:
            got = exc.result or result
            return self._outcome(series, directory, started, "failed", str(exc), got, fault="storage", storage_errno=exc.errno), expected
        except DicomwebError as exc:
            got = getattr(exc, "result", None) or result
            if is_connection_fault(exc):
                return self._outcome(series, directory, started, "incomplete", str(exc), got, fault="network"), expected
            status = getattr(exc, "status", None) if isinstance(exc, DicomwebRequestFailed) else None
            fault = "busy" if status in RETRY_STATUSES else "pacs"
            return self._outcome(series, directory, started, "failed", str(exc), got, fault=fault, answered=True), expected
        except OSError as exc:  # reading the series directory (e.g. a file where a directory must be)
            error = f"cannot read the series directory {directory}: {exc.strerror or exc}"
            return self._outcome(series, directory, started, "failed", error, result, fault="storage", storage_errno=exc.errno), expected

    def _instances(self, series: SeriesState) -> list[InstanceInfo] | None:
        """The series' instances over QIDO-RS; None (count unknown) when the server cannot list
        them. Transient failures and outages propagate (the attempt is retried or the run stops)."""
        try:
            found = self.session.find_instances(series.study_instance_uid, series.series_instance_uid)
        except DicomwebRequestFailed as exc:
            if exc.status in RETRY_STATUSES:
                raise
            log.warning("series %s: no instance list over QIDO-RS (%s); retrieving the whole series, its count unknown",
                        series.series_instance_uid, exc)  # fmt: skip
            return None
        if not found:
            log.warning("series %s: the instance query listed no instance; count taken as unknown", series.series_instance_uid)
            return None
        return found

    @staticmethod
    def _drop_lossy_transcodes(directory: Path, series: SeriesState, result: WadoResult, stored: dict[str, str | None]) -> str | None:
        """Remove instances sent lossy though the server stores them lossless (fetched again later)."""
        found = transcodings({uid: syntax for uid, (_c, syntax, _n) in result.arrived.items()}, stored)
        if not found.lossy:
            return None
        message = found.describe({uid: result.arrived[uid][1] for uid in found.lossy}, stored)
        for sop_uid in found.lossy:
            instance_file(directory, sop_uid).unlink(missing_ok=True)
        log.error("series %s: %s; removed, to be fetched again", series.series_instance_uid, message)
        return message

    @staticmethod
    def _outcome(
        series: SeriesState,
        directory: Path,
        started: float,
        status: str,
        error: str | None,
        result: WadoResult,
        fault: str | None = None,
        answered: bool = False,
        storage_errno: int | None = None,
        files: dict[str, int] | None = None,
    ) -> SeriesOutcome:
        if files is None:
            files = _on_disk(directory)
        return SeriesOutcome(
            series_instance_uid=series.series_instance_uid,
            status=status,
            instances=len(files),
            bytes_on_disk=sum(files.values()),
            bytes_received=result.bytes_received,
            seconds=time.monotonic() - started,
            error=error,
            fault=None if status == "complete" else fault,
            attempts=series.attempts,
            storage_errno=storage_errno,
            new_instances=len(result.arrived),
            answered=answered,
            arrived=dict(result.arrived),
        )


def _unclean(result: WadoResult) -> str:
    parts = []
    if result.refused:
        parts.append(f"{len(result.refused)} part(s) refused: {result.refused[0]}")
    if result.not_found:
        parts.append(f"{len(result.not_found)} instance(s) not found")
    return "; ".join(parts)
