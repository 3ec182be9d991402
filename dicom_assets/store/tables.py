"""SQLAlchemy Core table definitions mirroring ``schema.sql`` (PostgreSQL is authoritative).

PostgreSQL builds its schema from ``schema.sql``; SQLite builds it from :data:`metadata` (plus the
``date_modified`` triggers in :mod:`dicom_assets.store.base`). A test reflects a PostgreSQL
database built from ``schema.sql`` and compares it with these definitions.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

SERIES_STATUSES: tuple[str, ...] = ("pending", "in_progress", "complete", "incomplete", "failed", "skipped")

metadata = sa.MetaData()

#: The predicate of the partial index series_claim_idx. The claim query repeats it verbatim, so
#: PostgreSQL can use the index even in a generic plan of the prepared claim statement.
SERIES_NOT_COMPLETE = sa.text("download_status <> 'complete'")

# SQLite's CURRENT_TIMESTAMP has whole seconds only; this keeps milliseconds, in the format the
# SQLAlchemy SQLite DateTime type reads back (UTC, like every timestamp the store writes there).
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


class db_now(FunctionElement):
    """The database clock as a column default: ``now()`` on PostgreSQL, UTC with ms on SQLite."""

    type = sa.DateTime(timezone=True)
    name = "db_now"
    inherit_cache = True


@compiles(db_now)
def _db_now_default(element: db_now, compiler, **kw) -> str:
    return "now()"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler, **kw) -> str:
    return f"({SQLITE_NOW})"


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False, server_default=db_now()),
        sa.Column("date_modified", sa.DateTime(timezone=True), nullable=False, server_default=db_now()),
    ]


patients = sa.Table(
    "patients",
    metadata,
    sa.Column("patient_id", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, nullable=False, unique=True),
    sa.Column("patient_name", sa.Text),
    sa.Column("patient_sex", sa.Text),
    sa.Column("patient_birth_date", sa.Text),
    *_timestamps(),
    # added later by ALTER TABLE in schema.sql (incremental discovery), hence after the timestamps
    sa.Column("related_studies", sa.Integer),
    sa.Column("related_series", sa.Integer),
    sa.Column("related_instances", sa.Integer),
    sa.Column("studies_outdated_at", sa.DateTime(timezone=True), server_default=db_now()),
    sa.Column("pipeline_started_at", sa.DateTime(timezone=True)),  # store/pending_work.py
)

studies = sa.Table(
    "studies",
    metadata,
    sa.Column("study_instance_uid", sa.Text, primary_key=True),
    sa.Column(
        "patient_id", sa.Text, sa.ForeignKey("patients.patient_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("study_id", sa.Text),
    sa.Column("study_date", sa.Text),
    sa.Column("study_time", sa.Text),
    sa.Column("accession_number", sa.Text),
    sa.Column("study_description", sa.Text),
    sa.Column("modalities_in_study", sa.Text),
    *_timestamps(),
    # added later by ALTER TABLE in schema.sql (incremental discovery), hence after the timestamps
    sa.Column("related_series", sa.Integer),
    sa.Column("related_instances", sa.Integer),
    sa.Column("series_outdated_at", sa.DateTime(timezone=True), server_default=db_now()),
    # added later by ALTER TABLE in schema.sql (series filters: SOP class groups)
    sa.Column("sop_classes_in_study", sa.Text),
    sa.Index("studies_patient_idx", "patient_id"),
)

series = sa.Table(
    "series",
    metadata,
    sa.Column("series_instance_uid", sa.Text, primary_key=True),
    sa.Column(
        "study_instance_uid",
        sa.Text,
        sa.ForeignKey("studies.study_instance_uid", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column(
        "patient_id", sa.Text, sa.ForeignKey("patients.patient_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("series_number", sa.Integer),
    sa.Column("modality", sa.Text),
    sa.Column("series_description", sa.Text),
    sa.Column("body_part_examined", sa.Text),
    sa.Column("institution_name", sa.Text),
    sa.Column("series_date", sa.Text),
    sa.Column("series_time", sa.Text),
    sa.Column("expected_instances", sa.Integer),
    sa.Column("downloaded_instances", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("downloaded_bytes", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("download_status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("last_error", sa.Text),
    sa.Column("claimed_by", sa.Text),
    sa.Column("claim_expires_at", sa.DateTime(timezone=True)),
    sa.Column("downloaded_at", sa.DateTime(timezone=True)),
    *_timestamps(),
    # added later by ALTER TABLE in schema.sql (claims at scale), hence after the timestamps
    sa.Column("claimed_in_run", sa.Text),
    # added later by ALTER TABLE in schema.sql (attempts measure the series, not the network)
    sa.Column("network_faults", sa.Integer, nullable=False, server_default=sa.text("0")),
    # added later by ALTER TABLE in schema.sql (instances as received: dicom_assets.store.instances)
    sa.Column("transfer_syntaxes", sa.Text),
    sa.Column("transcoded_instances", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("lossy_transcoded_instances", sa.Integer, nullable=False, server_default=sa.text("0")),
    # added later by ALTER TABLE in schema.sql (series filters and request files)
    sa.Column("skip_reason", sa.Text),
    sa.Column("sop_classes", sa.Text),
    # added later by ALTER TABLE in schema.sql (de-identified copies)
    sa.Column("deid_excluded_reason", sa.Text),
    sa.CheckConstraint(
        "download_status IN (" + ", ".join(f"'{s}'" for s in SERIES_STATUSES) + ")",
        name="series_download_status_check",
    ),
    sa.Index("series_patient_idx", "patient_id"),
    sa.Index("series_study_idx", "study_instance_uid"),
    sa.Index("series_status_idx", "download_status"),
    # The claim order over not-complete series only: a claim reads a few entries of this index
    # however many series are complete.
    sa.Index(
        "series_claim_idx",
        "patient_id",
        "study_instance_uid",
        "series_number",
        "series_instance_uid",
        postgresql_where=SERIES_NOT_COMPLETE,
        sqlite_where=SERIES_NOT_COMPLETE,
    ),
)

archives = sa.Table(
    "archives",
    metadata,
    # BIGSERIAL on PostgreSQL; on SQLite only an INTEGER primary key auto-increments.
    sa.Column(
        "archive_id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column(
        "patient_id", sa.Text, sa.ForeignKey("patients.patient_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("file_name", sa.Text, nullable=False),
    sa.Column("series_count", sa.Integer, nullable=False),
    sa.Column("instance_count", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("superseded_at", sa.DateTime(timezone=True)),
    sa.Column("removed_at", sa.DateTime(timezone=True)),
    *_timestamps(),
    # added later by ALTER TABLE in schema.sql, hence after the timestamps
    sa.Column("published_to", sa.Text),
    sa.Column("published_at", sa.DateTime(timezone=True)),
    sa.Index("archives_patient_idx", "patient_id", "archive_id"),
)

# The PACS request budget (dicom_assets.pacs.budget.DatabaseBudget): a lock row per PACS and the
# log of the requests granted within the window. No date_modified: written on every request.
pacs_budgets = sa.Table(
    "pacs_budgets",
    metadata,
    sa.Column("pacs_key", sa.Text, primary_key=True),
    sa.Column("last_sent_at", sa.DateTime(timezone=True)),
    sa.Column("granted", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("deferred", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    # added later by ALTER TABLE in schema.sql (adaptive rate, dicom_assets.pacs.adaptive_rate)
    sa.Column("rate_limit", sa.Integer),
    sa.Column("rate_changed_at", sa.DateTime(timezone=True)),
    sa.Column("resets", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("lowest_limit", sa.Integer),
    sa.Column("last_reset_at", sa.DateTime(timezone=True)),
    # added later by ALTER TABLE in schema.sql (adaptive concurrency, dicom_assets.pacs.adaptive_concurrency)
    sa.Column("concurrency_limit", sa.Integer),
    sa.Column("concurrency_cut_at", sa.DateTime(timezone=True)),
    sa.Column("concurrency_peak", sa.Integer),
    sa.Column("concurrency_cuts", sa.BigInteger, nullable=False, server_default=sa.text("0")),
)

# The retrieves in flight to a PACS (dicom_assets.pacs.concurrency): one leased slot per worker.
pacs_slots = sa.Table(
    "pacs_slots",
    metadata,
    sa.Column("pacs_key", sa.Text, sa.ForeignKey("pacs_budgets.pacs_key", ondelete="CASCADE"), primary_key=True),
    sa.Column("holder", sa.Text, primary_key=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

pacs_request_log = sa.Table(
    "pacs_request_log",
    metadata,
    sa.Column(
        "request_id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column(
        "pacs_key", sa.Text, sa.ForeignKey("pacs_budgets.pacs_key", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("what", sa.Text, nullable=False),
    sa.Index("pacs_request_log_key_idx", "pacs_key", "sent_at"),
)

# Every instance written, with the syntax it arrived in (dicom_assets.store.instances).
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("sop_instance_uid", sa.Text, primary_key=True),
    sa.Column(
        "series_instance_uid", sa.Text, sa.ForeignKey("series.series_instance_uid", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("sop_class_uid", sa.Text),
    sa.Column("transfer_syntax_uid", sa.Text, nullable=False),
    sa.Column("stored_transfer_syntax_uid", sa.Text),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=db_now()),
    sa.Index("instances_series_idx", "series_instance_uid"),
)

# Incremental discovery: per PACS, the date watermark and when the last (full) pass ended.
discovery_watermarks = sa.Table(
    "discovery_watermarks",
    metadata,
    sa.Column("pacs_key", sa.Text, primary_key=True),
    sa.Column("watermark", sa.Text, nullable=False),
    sa.Column("passed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("full_pass_at", sa.DateTime(timezone=True)),
)

# PostgreSQL: which schema.sql texts (SHA-256) were applied, so create_schema() runs it once.
schema_applied = sa.Table(
    "schema_applied",
    metadata,
    sa.Column("sha256", sa.Text, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, server_default=db_now()),
)

REQUEST_RESOLUTIONS: tuple[str, ...] = ("unresolved", "found", "not_found", "ambiguous", "rejected")

request_rows = sa.Table(
    "request_rows",
    metadata,
    sa.Column("row_key", sa.Text, primary_key=True),
    sa.Column("row_number", sa.Integer, nullable=False),
    sa.Column("patient_id", sa.Text),
    sa.Column("accession_number", sa.Text),
    sa.Column("study_instance_uid", sa.Text),
    sa.Column("study_date_from", sa.Text),
    sa.Column("study_date_until", sa.Text),
    sa.Column("modalities", sa.Text),
    sa.Column("study_description", sa.Text),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("resolution", sa.Text, nullable=False, server_default=sa.text("'unresolved'")),
    sa.Column("reason", sa.Text),
    sa.Column("resolved_at", sa.DateTime(timezone=True)),
    *_timestamps(),
    sa.CheckConstraint(
        "resolution IN (" + ", ".join(f"'{r}'" for r in REQUEST_RESOLUTIONS) + ")",
        name="request_rows_resolution_check",
    ),
)

request_row_studies = sa.Table(
    "request_row_studies",
    metadata,
    sa.Column("row_key", sa.Text, sa.ForeignKey("request_rows.row_key", ondelete="CASCADE"), primary_key=True),
    sa.Column("study_instance_uid", sa.Text, primary_key=True),
    sa.Column("patient_id", sa.Text, nullable=False),
    sa.Index("request_row_studies_study_idx", "study_instance_uid"),
)

pseudonyms = sa.Table(
    "pseudonyms",
    metadata,
    sa.Column("patient_id", sa.Text, sa.ForeignKey("patients.patient_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("pseudonym", sa.Text, nullable=False, unique=True),
    sa.Column("date_shift_days", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("date_created", sa.DateTime(timezone=True), nullable=False, server_default=db_now()),
)

deidentified_archives = sa.Table(
    "deidentified_archives",
    metadata,
    sa.Column("archive_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("patient_id", sa.Text, sa.ForeignKey("patients.patient_id", ondelete="CASCADE"), nullable=False),
    sa.Column("source_archive_id", sa.BigInteger, nullable=False),
    sa.Column("file_name", sa.Text, nullable=False),
    sa.Column("series_count", sa.Integer, nullable=False),
    sa.Column("excluded_series", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("instance_count", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("superseded_at", sa.DateTime(timezone=True)),
    sa.Column("removed_at", sa.DateTime(timezone=True)),
    sa.Column("published_to", sa.Text),
    sa.Column("published_at", sa.DateTime(timezone=True)),
    sa.Column("date_created", sa.DateTime(timezone=True), nullable=False, server_default=db_now()),
    sa.Index("deidentified_archives_patient_idx", "patient_id", "archive_id"),
)

TIMESTAMPED_TABLES: tuple[sa.Table, ...] = (patients, studies, series, archives, request_rows)
