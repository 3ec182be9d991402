"""The bytes of instance data this process receives, for the adaptive concurrency's epochs
(:mod:`dicom_assets.pacs.concurrency`): counted where the data is written, as it arrives, so a
multi-GB instance counts while it streams, not only when it ends."""

from __future__ import annotations

import threading


class ByteMeter:
    """Bytes of instance data received by this process (every retrieval path adds to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._total += n

    @property
    def total(self) -> int:
        with self._lock:
            return self._total


#: The process's meter: the storage SCP, the C-GET sinks and WADO-RS add to it.
RECEIVED = ByteMeter()
