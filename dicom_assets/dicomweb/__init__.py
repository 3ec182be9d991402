"""DICOMweb: QIDO-RS discovery and WADO-RS retrieval over HTTP (``pacs.protocol: dicomweb``).

* :mod:`dicom_assets.dicomweb.http`: :class:`DicomwebHttp`, the pooled HTTP client with the
  request budget, backoff and clear errors every DICOMweb request goes through.
* :mod:`dicom_assets.dicomweb.qido`: :class:`QidoSession`, the find methods of the DIMSE
  ``PacsSession`` over QIDO-RS.
* :mod:`dicom_assets.dicomweb.wado`: WADO-RS retrieval.
"""
