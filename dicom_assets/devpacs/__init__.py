"""The bundled development PACS: a synthetic CT cohort generator, a mixed-content generator (every
kind of object, in every transfer syntax), a planned cohort for request files (particular
patients, accessions, localizers and reports) and a Q/R SCP serving a folder.

Plain pynetdicom + pydicom (no Dagster), so the demo, the fast tests and offline users can run a
realistic PACS in-process or with ``dicom-assets pacs serve``.
"""

from dicom_assets.devpacs.cohort import CohortSpec, CohortSummary, GeneratedSeries, add_series, generate_cohort
from dicom_assets.devpacs.mixed import MIXED_KINDS, MixedInstance, generate_mixed_set
from dicom_assets.devpacs.request_cohort import (
    PlannedSeries,
    PlannedStudy,
    WrittenCohort,
    bulk_request_cohort,
    request_test_cohort,
    write_planned_cohort,
)
from dicom_assets.devpacs.server import DevPacs, serve_forever

__all__ = [
    "MIXED_KINDS",
    "CohortSpec",
    "CohortSummary",
    "DevPacs",
    "GeneratedSeries",
    "MixedInstance",
    "PlannedSeries",
    "PlannedStudy",
    "WrittenCohort",
    "add_series",
    "bulk_request_cohort",
    "generate_cohort",
    "generate_mixed_set",
    "request_test_cohort",
    "serve_forever",
    "write_planned_cohort",
]
