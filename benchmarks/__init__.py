"""``make bench``: the project measured side by side with DCMTK and Info-ZIP on the same data.

``python -m benchmarks.run`` generates a synthetic CT cohort, serves it from a throwaway Orthanc
on loopback and measures retrieval (``dicom-assets sync`` vs ``movescu``+``storescp`` and
``getscu``), archiving (``build_patient_archive`` vs ``zip``), discovery and scale; it writes
``benchmarks/results.md``, ``results.json`` and ``results.png``. See ``benchmarks/run.py``.
"""
