"""Heartbeat pings, healthchecks.io style, so the old status badges keep working.

A check URL gets ``<url>/start`` when a job starts, ``<url>`` when it succeeds and
``<url>/fail`` when it fails. A ping never raises: a monitoring service being down must not
fail the pipeline. The URL is never logged whole (it is a secret: whoever has it can ping).
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Literal

log = logging.getLogger("dicom_assets.heartbeat")

Signal = Literal["start", "success", "fail"]


def ping_url(base: str, signal: Signal) -> str:
    base = base.rstrip("/")
    return base if signal == "success" else f"{base}/{signal}"


def redact(url: str) -> str:
    """Scheme and host only: the path of a check URL is its secret."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}/…"


def ping(base: str, signal: Signal, body: str = "", timeout_s: float = 10.0) -> bool:
    """POST ``body`` (e.g. the run id) to the check's URL for ``signal``; True when it answered 2xx."""
    request = urllib.request.Request(ping_url(base, signal), data=body.encode("utf-8")[:10_000], method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("heartbeat %s to %s failed: %s", signal, redact(base), getattr(exc, "reason", exc))
        return False
