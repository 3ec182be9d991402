"""dicom_assets: a Dagster asset graph that pulls DICOM cohorts out of a PACS into research storage.

``dagster ... -m dicom_assets`` finds the code location's :data:`defs` here.
"""

from dicom_assets.definitions import defs

__all__ = ["defs"]
