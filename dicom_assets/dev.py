"""``dicom-assets dev``: the Dagster UI on 127.0.0.1 over the demo world.

Reuses the demo's work directory when ``make demo`` made one (so its runs, partitions and
materializations are there to look at), otherwise creates a fresh cohort. The bundled PACS runs
in this process on new loopback ports (the config is rewritten to match) while the UI runs as a
child with ``DICOM_ASSETS_CONFIG`` and ``DAGSTER_HOME`` pointing into the work dir.

The UI is Dagster's current ``dg dev`` when the ``dg`` CLI (dagster-dg-cli, a dependency) is
installed, else the older ``dagster dev`` (which Dagster marks superseded by ``dg dev``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from dicom_assets.demo import MARKER, _free_port, _prepare, write_demo_config
from dicom_assets.devpacs import CohortSpec, DevPacs, generate_cohort


def _ensure_world(workdir: Path) -> Path:
    workdir = workdir.resolve()
    if (workdir / MARKER).exists() and (workdir / "config.yaml").exists() and (workdir / "pacs").is_dir():
        return workdir
    workdir = _prepare(workdir)
    generate_cohort(workdir / "pacs", CohortSpec(patients=4, studies_per_patient=2, series_per_study=2, slices_per_series=12, rows=128, columns=128, patient_id_prefix="DEMO-", seed=7))
    (workdir / "dagster_home").mkdir()
    (workdir / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return workdir


def ui_command(host: str, port: int) -> list[str]:
    """``dg dev`` when the dg CLI is installed next to this Python, else ``dagster dev``.

    Both serve ``-m dicom_assets`` from the work dir, as before. (A bare ``dg dev`` would load the
    same location through ``[tool.dg]``, but from the checkout's root, where Dagster warns about
    the production dagster.yaml that DAGSTER_HOME overrides.)
    """
    bindir = str(Path(sys.executable).parent)
    listen = ["-h", host, "-p", str(port)]
    if dg := shutil.which("dg", path=bindir):
        return [dg, "dev", "-m", "dicom_assets", *listen]
    dagster = shutil.which("dagster", path=bindir) or "dagster"
    return [dagster, "dev", *listen, "-m", "dicom_assets"]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_dev(workdir: Path, ui_port: int = 3000) -> int:
    """Serve the demo PACS and run the UI (``dg dev``, see :func:`ui_command`) until it exits
    (Ctrl-C stops both)."""
    workdir = _ensure_world(workdir)
    old = yaml.safe_load((workdir / "config.yaml").read_text()) if (workdir / "config.yaml").exists() else {}
    receiver_port = _free_port()
    with DevPacs(workdir / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", receiver_port)}) as pacs:
        config = write_demo_config(workdir, pacs.port, receiver_port)
        if old.get("selection"):
            merged = yaml.safe_load(config.read_text())
            merged["selection"] = old["selection"]
            config.write_text(yaml.safe_dump(merged, sort_keys=False))
        env = {
            **os.environ,
            "DICOM_ASSETS_CONFIG": str(config),
            "DAGSTER_HOME": str(workdir / "dagster_home"),
        }
        command = ui_command("127.0.0.1", ui_port)
        print(f"bundled PACS on 127.0.0.1:{pacs.port}; Dagster UI on http://127.0.0.1:{ui_port} (Ctrl-C stops)", flush=True)
        child = subprocess.Popen(command, env=env, cwd=workdir)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            return child.wait()
