"""De-identified copies for sharing (issue 12): the domain core, plain Python without Dagster.

* :mod:`~dicom_assets.deid.profile`: PS3.15 Table E.1-1 (basic action + option columns), from
  well-kept packages' data;
* :mod:`~dicom_assets.deid.options`: the options a site chooses (:class:`DeidOptions`);
* :mod:`~dicom_assets.deid.keys`: keyed pseudonyms, UIDs and date shifts (:class:`DeidKeys`);
* :mod:`~dicom_assets.deid.deidentify`: one instance at a time (:class:`Deidentifier`), and which
  series are left out for burned-in text (:func:`burned_in_reason`);
* :mod:`~dicom_assets.deid.plan`, :mod:`~dicom_assets.deid.walk`, :mod:`~dicom_assets.deid.values`,
  :mod:`~dicom_assets.deid.clean`, :mod:`~dicom_assets.deid.part10`: how.

``pipeline.py`` (the asset's work: crosswalk, zips) builds on these.
"""
