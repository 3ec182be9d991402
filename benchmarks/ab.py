"""One association (or the defaults) against DCMTK, round after round: the A/B behind the
one-association and defaults targets.

    python -m benchmarks.ab [--rounds 5] [--methods c-move,c-get] [--associations 1|0] [--work-dir bench-work]

One Orthanc loaded with ``make bench``'s retrieval cohort (1.09 GB, cached), then ``--rounds``
rounds of, per method, DCMTK (``movescu``+``storescp`` / ``getscu``, ``TCP_NODELAY=1``) and
``dicom-assets sync`` with one association, back to back so both meet the same moment of the
machine. This VM moves single figures by 20-40 % from one run to the next; the best and the
median of each over the rounds are what a change is judged on, never one run. Prints one line
per run and a summary; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import dcmtk  # noqa: E402
from benchmarks.cohorts import Cohort, bench_cohorts  # noqa: E402
from benchmarks.measure import settle_disk  # noqa: E402
from benchmarks.orthanc_site import Site, load_directory, start_site  # noqa: E402
from benchmarks.project import ProjectVariant, run_project_variant  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _dcmtk(site: Site, cohort: Cohort, base: Path, method: str) -> tuple[float, float]:
    """(MB/s, CPU s) of one DCMTK retrieval of the whole cohort."""
    retrieve = dcmtk.move_with_storescp if method == "c-move" else dcmtk.get_with_getscu
    try:
        result = retrieve(site, cohort.series, base / "received", base / "logs", True)
    finally:
        shutil.rmtree(base / "received", ignore_errors=True)
    if result.files != cohort.instances:
        raise RuntimeError(f"DCMTK {method}: {result.files} of {cohort.instances} instances")
    return result.bytes / 1e6 / result.wall_s, result.cpu_s


def _ours(site: Site, cohort: Cohort, base: Path, method: str, pg: str, associations: int,
          log: Callable[[str], None] = print) -> tuple[float, float]:
    """(MB/s, CPU s of the retrieval) of one ``dicom-assets sync`` with a fixed association count,
    or (``associations`` 0) with the defaults, whose moves of the count are logged."""
    defaults = associations == 0
    variant = ProjectVariant(method, associations, defaults, () if defaults else (("adaptive_concurrency", False),))
    try:
        result = run_project_variant(site, variant, base, pg, "^" + cohort.spec.patient_id_prefix)
        if defaults:
            for line in result.usage.log_file.read_text(errors="replace").splitlines():
                if "concurrent retrieves" in line:
                    log("    " + line.strip())
    finally:
        for bulky in ("downloads", "archives"):
            shutil.rmtree(base / bulky, ignore_errors=True)
    if result.instances_received != cohort.instances:
        raise RuntimeError(f"sync {method}: {result.instances_received} of {cohort.instances} instances\n{result.usage.log_tail()}")
    return result.bytes_received / 1e6 / result.retrieval_s, result.retrieval_cpu_s or 0.0


def run(rounds: int, methods: Sequence[str], work_dir: Path, pg: str, associations: int, log: Callable[[str], None] = print) -> dict[str, dict[str, list[float]]]:
    cohort = bench_cohorts(work_dir, quick=False).retrieval
    figures: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ab-") as scratch:
        base = Path(scratch)
        site = start_site(base / "orthanc")
        try:
            load_directory(site, cohort.dicom_dir)
            for n in range(rounds):
                for method in methods:
                    for who, measure in (
                        ("dcmtk", lambda: _dcmtk(site, cohort, base / f"dcmtk-{method}", method)),
                        ("ours", lambda: _ours(site, cohort, base / f"ours-{method}-{n}", method, pg, associations, log)),
                    ):
                        settle_disk(1.0)
                        mb_s, cpu = measure()
                        figures.setdefault(f"{who} {method}", {"mb_per_s": [], "cpu_s": []})
                        figures[f"{who} {method}"]["mb_per_s"].append(round(mb_s, 1))
                        figures[f"{who} {method}"]["cpu_s"].append(round(cpu, 2))
                        log(f"round {n + 1}: {who:5} {method}: {mb_s:6.1f} MB/s, CPU {cpu:.2f} s")
        finally:
            site.orthanc.stop()
    for method in methods:
        d, o = figures[f"dcmtk {method}"]["mb_per_s"], figures[f"ours {method}"]["mb_per_s"]
        log(f"{method}: best {max(o):.1f} vs {max(d):.1f} MB/s = {max(o) / max(d):.2f}x; "
            f"median {statistics.median(o):.1f} vs {statistics.median(d):.1f} = {statistics.median(o) / statistics.median(d):.2f}x")  # fmt: skip
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", default="c-move,c-get", help="comma-separated: c-move, c-get")
    parser.add_argument("--associations", type=int, default=1, help="the project's fixed association count (default 1; 0: the defaults, adaptive)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench-work")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    figures = run(args.rounds, args.methods.split(","), args.work_dir.resolve(), args.pg_admin_url, args.associations)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
