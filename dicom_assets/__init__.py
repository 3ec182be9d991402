"""dicom_assets: a Dagster asset graph that pulls DICOM cohorts out of a PACS into research storage.

``dagster ... -m dicom_assets`` finds the code location's :data:`defs` here.
"""

import warnings

import dagster as _dg

# We use backfill policies and partitioned asset checks on purpose; say so once, not per import.
warnings.filterwarnings("ignore", category=_dg.BetaWarning)
warnings.filterwarnings("ignore", category=_dg.PreviewWarning)

from dicom_assets.definitions import defs  # noqa: E402

__all__ = ["defs"]
