"""The state DB: :class:`StateStore`, every query the project makes (SQLAlchemy Core).

PostgreSQL in production (schema from schema.sql), SQLite as the embedded default, same code.

The queries are grouped by concern, one module each, and StateStore combines them:

- :mod:`~dicom_assets.store.base`: engine, transactions, "now", ``create_schema``, ``dispose``;
- :mod:`~dicom_assets.store.discovery`: upserts of patients, studies and series;
- :mod:`~dicom_assets.store.incremental`: related counts, outdated marks, discovery watermarks;
- :mod:`~dicom_assets.store.lookups`: reads of patients, studies and series;
- :mod:`~dicom_assets.store.claims`: retrieval claims;
- :mod:`~dicom_assets.store.archives`: archive records and archive candidates;
- :mod:`~dicom_assets.store.reporting`: status and patient counts, the inventory;
- :mod:`~dicom_assets.store.selection`: series facts for the series filters, ``skipped`` marks;
- :mod:`~dicom_assets.store.budget`: the PACS request budget;
- :mod:`~dicom_assets.store.concurrency`: the shared count of concurrent retrieves and its slots;
- :mod:`~dicom_assets.store.requests`: the request file's rows and what they resolved to;
- :mod:`~dicom_assets.store.deid`: the crosswalk (pseudonyms) and the de-identified zips;
- :mod:`~dicom_assets.store.pending_work`: patients with work no pipeline run has seen yet.

Time: on PostgreSQL every "now" is the database clock (``now()``); on SQLite it is Python's UTC
clock, stored as naive UTC text (the SQLAlchemy SQLite DateTime format), so string comparison is
time comparison. Every datetime a method returns is timezone-aware UTC on both backends.

Transactions: each public method is one transaction. On SQLite a writing method starts with
``BEGIN IMMEDIATE`` (it takes the write lock up front, so a read-then-write never fails to
upgrade its lock), reads use a deferred ``BEGIN``; WAL mode lets readers run beside the writer
and the busy timeout makes writers queue instead of failing.
"""

from __future__ import annotations

from dicom_assets.store.archives import ArchiveQueries
from dicom_assets.store.base import BATCH_ROWS, SCHEMA_SQL, SQLITE_BUSY_TIMEOUT_S, StoreBase
from dicom_assets.store.concurrency import ConcurrencyQueries, ConcurrencyState
from dicom_assets.store.claims import ClaimQueries
from dicom_assets.store.deid import DeidQueries
from dicom_assets.store.discovery import DiscoveryQueries
from dicom_assets.store.instances import InstanceQueries, ReceivedSummary
from dicom_assets.store.incremental import DiscoveryWatermark, IncrementalDiscoveryQueries, OutdatedRow, RelatedCounts
from dicom_assets.store.lookups import LookupQueries
from dicom_assets.store.pending_work import PendingWork, PendingWorkQueries
from dicom_assets.store.reporting import ReportQueries
from dicom_assets.store.selection import SeriesSelectionQueries, SkipCounts
from dicom_assets.store.requests import RequestQueries

__all__ = [
    "BATCH_ROWS",
    "SCHEMA_SQL",
    "SQLITE_BUSY_TIMEOUT_S",
    "ConcurrencyState",
    "DiscoveryWatermark",
    "OutdatedRow",
    "PendingWork",
    "ReceivedSummary",
    "SkipCounts",
    "RelatedCounts",
    "StateStore",
]


class StateStore(
    DiscoveryQueries,
    IncrementalDiscoveryQueries,
    LookupQueries,
    ClaimQueries,
    ReportQueries,
    ArchiveQueries,
    ConcurrencyQueries,
    InstanceQueries,
    SeriesSelectionQueries,
    RequestQueries,
    DeidQueries,
    PendingWorkQueries,
    StoreBase,
):
    """Thread-safe handle on the state DB (one SQLAlchemy engine; each method is one transaction)."""
