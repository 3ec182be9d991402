"""The bundled development PACS: a synthetic CT cohort generator and a Q/R SCP serving a folder.

Plain pynetdicom + pydicom (no Dagster), so the demo, the fast tests and offline users can run a
realistic PACS in-process or with ``dicom-assets pacs serve``.
"""

from dicom_assets.devpacs.cohort import CohortSpec, CohortSummary, GeneratedSeries, add_series, generate_cohort
from dicom_assets.devpacs.server import DevPacs, serve_forever

__all__ = [
    "CohortSpec",
    "CohortSummary",
    "DevPacs",
    "GeneratedSeries",
    "add_series",
    "generate_cohort",
    "serve_forever",
]
