"""The reference retrievers: DCMTK ``movescu`` + ``storescp +B`` and ``getscu``.

Both send one series-level C-MOVE / C-GET at a time (a DICOM query file per series:
QueryRetrieveLevel=SERIES, Study Root). ``movescu`` gets all query files and sends them in ONE
association; ``getscu`` runs once per series (one association each), because DCMTK 3.6.7's
getscu crashes (SIGSEGV) after the last C-GET when given several query files. ``storescp`` runs as one process (no ``--fork``) with ``+B`` (bit-preserving: written
straight to disk as received). DCMTK turns Nagle's algorithm off only when ``TCP_NODELAY`` is
set in its environment; without it every C-STORE response waits on the peer's delayed ACK
(~40 ms per instance), so each variant is measured both ways.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydicom.dataset import Dataset

from benchmarks.measure import ChildUsage, environment, run_child, start_child
from benchmarks.orthanc_site import DCMTK_AET, Site
from dicom_assets.devpacs.cohort import GeneratedSeries
from dicom_assets_tests.orthanc import ORTHANC_AET

RETRIEVE_TIMEOUT_S = 900.0
SCP_READY_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class DcmtkResult:
    """One DCMTK retrieval: the processes' total cost and what landed on disk."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    files: int
    bytes: int
    usages: tuple[ChildUsage, ...]


def dcmtk_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"DCMTK's {name} is not installed (apt-get install dcmtk; see scripts/ensure-services.sh)")
    return path


def write_query_files(series: Sequence[GeneratedSeries], directory: Path) -> list[Path]:
    """One series-level Study Root identifier per series, as raw little-endian datasets."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for n, s in enumerate(series):
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = s.study_instance_uid
        ds.SeriesInstanceUID = s.series_instance_uid
        path = directory / f"query-{n:05d}.dcm"
        ds.save_as(path, implicit_vr=True, little_endian=True)
        files.append(path)
    return files


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    """This environment with ``TCP_NODELAY=1`` set, or with it removed."""
    return environment(TCP_NODELAY="1" if nodelay else None)


def received_files(directory: Path) -> tuple[int, int]:
    """(file count, bytes) of the regular, non-hidden files under ``directory``."""
    count = size = 0
    for root, _, names in os.walk(directory):
        for name in names:
            if not name.startswith("."):
                count += 1
                size += os.path.getsize(os.path.join(root, name))
    return count, size


def _wait_for_scp(port: int, env: dict[str, str], log_dir: Path) -> None:
    """Until ``storescp`` answers a C-ECHO (it is listening and accepting associations)."""
    deadline = time.monotonic() + SCP_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        echo = run_child([dcmtk_binary("echoscu"), "-aet", ORTHANC_AET, "-aec", DCMTK_AET, "127.0.0.1", str(port)], log_dir / "echoscu.log", env)
        if echo.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"storescp did not answer C-ECHO on 127.0.0.1:{port} within {SCP_READY_TIMEOUT_S:.0f} s")


def move_with_storescp(site: Site, series: Sequence[GeneratedSeries], out_dir: Path, log_dir: Path, nodelay: bool) -> DcmtkResult:
    """``storescp +B`` on the DCMTK port, then one ``movescu`` association with one C-MOVE per series."""
    env = dcmtk_env(nodelay)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = write_query_files(series, log_dir / "queries")
    scp = start_child(
        [dcmtk_binary("storescp"), "-aet", DCMTK_AET, "+B", "-od", str(out_dir), str(site.dcmtk_receiver_port)],
        log_dir / "storescp.log", env,
    )  # fmt: skip
    try:
        _wait_for_scp(site.dcmtk_receiver_port, env, log_dir)
        started = time.monotonic()
        move = run_child(
            [dcmtk_binary("movescu"), "-S", "-aet", DCMTK_AET, "-aec", ORTHANC_AET, "-aem", DCMTK_AET,
             "127.0.0.1", str(site.dicom_port), *map(str, queries)],
            log_dir / "movescu.log", env, timeout_s=RETRIEVE_TIMEOUT_S,
        )  # fmt: skip
        wall = time.monotonic() - started
    finally:
        scp_usage = scp.finish(timeout_s=30, terminate=True)
    if move.returncode != 0:
        raise RuntimeError(f"movescu exited with {move.returncode}\n{move.log_tail()}\n--- storescp ---\n{scp_usage.log_tail()}")
    files, size = received_files(out_dir)
    return DcmtkResult(wall, move.cpu_s + scp_usage.cpu_s, max(move.peak_rss_mb, scp_usage.peak_rss_mb), files, size, (move, scp_usage))


def get_with_getscu(site: Site, series: Sequence[GeneratedSeries], out_dir: Path, log_dir: Path, nodelay: bool) -> DcmtkResult:
    """One ``getscu +B`` per series (one association, one C-GET), one after the other."""
    env = dcmtk_env(nodelay)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = write_query_files(series, log_dir / "queries")
    usages = []
    started = time.monotonic()
    for query in queries:
        get = run_child(
            [dcmtk_binary("getscu"), "-S", "-aet", DCMTK_AET, "-aec", ORTHANC_AET, "+B", "-od", str(out_dir),
             "127.0.0.1", str(site.dicom_port), str(query)],
            log_dir / f"getscu-{query.stem}.log", env, timeout_s=RETRIEVE_TIMEOUT_S,
        )  # fmt: skip
        if get.returncode != 0:
            raise RuntimeError(f"getscu {query.name} exited with {get.returncode}\n{get.log_tail()}")
        usages.append(get)
    wall = time.monotonic() - started
    files, size = received_files(out_dir)
    return DcmtkResult(wall, sum(u.cpu_s for u in usages), max(u.peak_rss_mb for u in usages), files, size, tuple(usages))
