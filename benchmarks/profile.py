"""Where one association's time goes: the one-association C-MOVE sync, sampled by py-spy.

The retrieval target is set for ONE association; when the project misses it, this is the
profile that shows why. ``dicom-assets sync`` (C-MOVE, one association) runs once more under
``py-spy record --idle --threads`` (wall-clock samples of every thread, idle ones included),
and the samples of two threads are sorted into what they were doing:

* the **receiving** threads (``StorageReceiver._serve``: one per association Orthanc opens to
  our storage SCP, one at a time here), which are the path every instance takes;
* the **requesting** thread (``PacsSession.move``: the C-MOVE and its responses, state DB
  bookkeeping between series).

A sample goes to the first category found walking its stack from the innermost frame out.
"Waiting for the PACS's bytes" includes the kernel copying them into our buffer. py-spy
slows the process a little, so the profiled run's own MB/s is reported beside it.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from benchmarks.orthanc_site import Site
from benchmarks.project import ProjectVariant, run_project_variant

SAMPLES_PER_S = 250
#: (category, function names that mark it), tried innermost frame first; first match wins.
RECEIVING = (
    ("writing instance files", ("IncomingInstance._append",)),
    ("creating instance files", ("IncomingInstance._open_file",)),
    ("closing and renaming instance files", ("IncomingInstance.finish",)),
    ("sending C-STORE responses", ("Association.send_command",)),
    ("waiting for the PACS's bytes", ("_Buffered._fill",)),
    ("association set-up", ("read_association_request", "accept", "StorageReceiver._acceptable")),
)
REQUESTING = (
    ("state DB (claims, results)", ("StateStore.",)),
    ("waiting for C-MOVE responses", ("_Buffered._fill",)),
    ("opening the association", ("RequestorAssociation.open",)),
)
OTHER = "other (PDU parsing, routing, Python)"
_FRAME = re.compile(r"^(?P<function>.+?) \(")


def py_spy() -> str | None:
    """py-spy of this interpreter's environment (the bench extra installs it), else on PATH."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def _functions(stack: str) -> tuple[str, list[str]]:
    """(thread, function names from the outermost frame in) of one collapsed py-spy line."""
    thread, *frames = stack.split(";")
    return thread, [m["function"] if (m := _FRAME.match(f)) else f for f in frames]


def _category(functions: list[str], categories: Iterable[tuple[str, tuple[str, ...]]]) -> str:
    for function in reversed(functions):
        for name, marks in categories:
            if any(function == m or (m.endswith(".") and function.startswith(m)) for m in marks):
                return name
    return OTHER


def summarize(raw: Path) -> dict[str, Any]:
    """Sample counts per category for the receiving and the requesting threads."""
    receiving: Counter[str] = Counter()
    requesting: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        _thread, functions = _functions(stack)
        if "StorageReceiver._serve" in functions:
            receiving[_category(functions, RECEIVING)] += int(count)
        elif "PacsSession.move" in functions:
            requesting[_category(functions, REQUESTING)] += int(count)
    return {"receiving": dict(receiving), "requesting": dict(requesting), "samples_per_s": SAMPLES_PER_S}


def profile_one_association(site: Site, directory: Path, pg_server_url: str, patient_id_regex: str) -> dict[str, Any]:
    """Run the one-association C-MOVE sync under py-spy; its MB/s and the sorted samples."""
    spy = py_spy()
    if spy is None:
        return {"status": "not run", "reason": "py-spy is not installed (make bench installs it with the bench extra)"}
    raw = directory / "py-spy.txt"
    wrap = [spy, "record", "--idle", "--threads", "--format", "raw", "-r", str(SAMPLES_PER_S), "-o", str(raw), "--"]
    result = run_project_variant(site, ProjectVariant("c-move", 1, False), directory, pg_server_url, patient_id_regex, wrap=wrap)
    for bulky in ("downloads", "archives"):
        shutil.rmtree(directory / bulky, ignore_errors=True)
    if not raw.is_file():
        return {"status": "failed", "reason": f"py-spy wrote no profile\n{result.usage.log_tail()}"}
    seconds = result.retrieval_s
    return {
        "status": "ok",
        "instances": result.instances_received,
        "seconds": round(seconds, 2),
        "mb_per_s": round(result.bytes_received / 1e6 / seconds, 1) if seconds else None,
        **summarize(raw),
    }
