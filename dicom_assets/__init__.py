"""dicom_assets: a Dagster asset graph that pulls DICOM cohorts out of a PACS."""
