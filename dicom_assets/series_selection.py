"""Applying the series selection after discovery: which known series are ``skipped``, and why.

Run by the ``series`` asset after :func:`dicom_assets.discovery.discover_series`, so every
``dicom-assets sync``, schedule and manual run applies it. It looks at every series of the
patients in the state DB (not only the ones just discovered), so a changed filter takes effect
on the next run: newly unwanted series become ``skipped``, series wanted again go back to
``pending`` and are fetched. Nothing complete is dropped (see :mod:`dicom_assets.store.selection`).

The decision is local: the filter reads the full SERIES-level answer already stored. Sending
Modality or SeriesDescription as C-FIND keys would cost the same one C-FIND per study, and a
series the PACS never returned could not be recorded as skipped with its reason. The only PACS
requests here are the SOP class look-ups a configured SOP class group needs
(:meth:`~dicom_assets.series_filter.SeriesFilter.needs_sop_classes`): one IMAGE-level C-FIND per
such series, once (its classes are stored in ``series.sop_classes``).

``request_skip`` is the request file's hook: given a series' facts it returns why the request
file's rows do not want it (that reason wins over the filter's), or None.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dicom_assets.pacs.client import PacsClient, PacsSession
from dicom_assets.pacs.errors import PacsRequestFailed
from dicom_assets.series_filter import (
    SeriesFacts,
    SeriesFilter,
    join_sop_classes,
    split_sop_classes,
)
from dicom_assets.store.state import StateStore

log = logging.getLogger("dicom_assets.series_selection")

#: The request file's hook: why its rows do not want this series, or None.
RequestSkip = Callable[[SeriesFacts], "str | None"]


@dataclass
class SelectionStats:
    """What one application of the selection did, for the ``series`` asset's metadata."""

    series_checked: int = 0
    series_skipped: int = 0  # newly skipped
    skip_reasons_changed: int = 0
    series_unskipped: int = 0  # back to pending: wanted again
    series_kept_complete: int = 0  # unwanted now but complete or being retrieved: left as they are
    skipped_total: int = 0  # series of these patients skipped after this step
    sop_class_queries: int = 0  # IMAGE-level C-FINDs for SOP classes
    pacs_requests: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)  # skip reason -> series of these patients

    def metadata(self) -> dict[str, float | int]:
        return {
            "series_checked": self.series_checked,
            "series_skipped": self.series_skipped,
            "series_skipped_total": self.skipped_total,
            "skip_reasons_changed": self.skip_reasons_changed,
            "series_unskipped": self.series_unskipped,
            "series_unwanted_but_complete": self.series_kept_complete,
            "sop_class_queries": self.sop_class_queries,
            "selection_pacs_requests": self.pacs_requests,
            "selection_seconds": round(self.seconds, 3),
        }


def _lookup_sop_classes(session: PacsSession, facts: SeriesFacts) -> str:
    """The series' SOP classes from one IMAGE-level C-FIND (retried like every query); ``""``
    when the PACS refuses the query (it is then never asked again, and nothing is skipped for
    a class nobody knows)."""
    what = f"C-FIND of the SOP classes of series {facts.series_instance_uid}"
    try:
        found = session.retrying(lambda: session.find_instances(facts.study_instance_uid, facts.series_instance_uid), what)
    except PacsRequestFailed as exc:
        log.warning("%s: %s; its SOP class groups stay unknown, so they skip nothing", what, exc)
        return ""
    return join_sop_classes([i.sop_class_uid or "" for i in found])


def _with_sop_classes(
    facts: list[SeriesFacts], needed: Sequence[SeriesFacts], pacs: PacsClient | PacsSession, stats: SelectionStats,
    store: StateStore,
) -> list[SeriesFacts]:
    """Ask the PACS for the SOP classes of ``needed`` (one session for all), store them, and
    return ``facts`` with them filled in."""
    found: dict[str, str] = {}
    with ExitStack() as stack:
        session = pacs if isinstance(pacs, PacsSession) else stack.enter_context(pacs.session())
        before = session.requests
        for f in needed:
            found[f.series_instance_uid] = _lookup_sop_classes(session, f)
        stats.pacs_requests += session.requests - before
    stats.sop_class_queries += len(needed)
    store.record_series_sop_classes(found)
    return [
        dataclasses.replace(f, sop_classes=split_sop_classes(found[f.series_instance_uid]))
        if f.series_instance_uid in found else f
        for f in facts
    ]  # fmt: skip


def apply_series_selection(
    store: StateStore,
    pacs: PacsClient | PacsSession | None,
    patient_ids: Sequence[str],
    series_filter: SeriesFilter | None,
    request_skip: RequestSkip | None = None,
) -> SelectionStats:
    """Decide every known series of these patients and record it (see the module docstring).

    ``pacs``: a client (a session is opened only when a SOP class look-up is needed) or an open
    session; None never asks (series needing a look-up are then kept). Returns the figures.
    """
    started = time.monotonic()
    stats = SelectionStats()
    facts = store.series_facts(patient_ids)
    stats.series_checked = len(facts)
    hook = {f.series_instance_uid: request_skip(f) for f in facts} if request_skip else {}
    if series_filter is not None and series_filter.active:
        needed = [f for f in facts if hook.get(f.series_instance_uid) is None and series_filter.needs_sop_classes(f)]
        if needed and pacs is not None:
            facts = _with_sop_classes(facts, needed, pacs, stats, store)
    decisions: dict[str, str | None] = {}
    for f in facts:
        reason = hook.get(f.series_instance_uid)
        if reason is None and series_filter is not None and series_filter.active:
            reason = series_filter.skip_reason(f)
        if reason is not None or f.download_status == "skipped":
            decisions[f.series_instance_uid] = reason  # unchanged wanted series are not written
        if reason is not None and f.download_status in ("pending", "incomplete", "failed", "skipped"):
            stats.reasons[reason] += 1
    counts = store.apply_series_skips(decisions)
    stats.series_skipped, stats.skip_reasons_changed = counts.skipped, counts.reason_changed
    stats.series_unskipped, stats.series_kept_complete = counts.unskipped, counts.held
    stats.skipped_total = sum(stats.reasons.values())
    stats.seconds = time.monotonic() - started
    return stats
