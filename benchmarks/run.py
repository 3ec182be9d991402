"""``make bench``: measure the project against DCMTK and Info-ZIP on the same data, in one run.

    python -m benchmarks.run [--quick] [--out benchmarks/results.md] [--work-dir bench-work]
    .venv/bin/python benchmarks/run.py ...   (same)

Steps (progress lines on stdout as it goes):

a. the cohort: 8 patients x 2 series x 130 slices of 512x512 16-bit CT (1.09 GB) for retrieval,
   plus one 352 MB patient for archiving, generated once into ``<work-dir>/cohort-<spec digest>``;
b. a throwaway Orthanc on free loopback ports that knows the project's and DCMTK's AE titles,
   with its DICOMweb plugin (WADO-RS from the same storage), loaded with the cohort over REST (timed);
c. retrieval variants, each into an empty directory, checked file by file count: DCMTK
   ``movescu``+``storescp`` and ``getscu`` with ``TCP_NODELAY=1`` (the reference), the project's
   ``dicom-assets sync`` with C-MOVE, C-GET and WADO-RS (``pacs.protocol: dicomweb``) at the
   default and at other association (request) counts (fresh PostgreSQL state DB each), then DCMTK
   and the project's one-association C-MOVE and C-GET once more (each keeps its faster run), then
   DCMTK with Nagle on (its default);
   then the one-association C-MOVE sync once more under py-spy (``benchmarks/profile.py``: where
   its time goes, the profile behind the one-association target);
c2. over a WAN (``benchmarks/wan.py``, a child process with its own Orthanc): the same cohort with
   10 ms added one way on every path by the project's delay proxy: DCMTK movescu+storescp, the
   sync's defaults, 1/2/4/8 fixed associations, adaptive (skipped until it exists), WADO-RS;
   ``$BENCH_WAN_PATIENTS`` takes a smaller cohort of that shape;
d. archiving: ``build_patient_archive`` vs ``zip -r -6`` and ``zip -r -1``;
d2. one large instance (``benchmarks/large_instance.py``: 4,000 frames of 512x512, 2.1 GB,
   cached like the cohorts): peak RSS and throughput of archiving it (child process), and of a
   ``dicom-assets sync`` retrieving it from an Orthanc holding only it;
e. discovery, request file (a 1,000-row file: first, unchanged, 10 rows added, full pass) and
   scale, each in a child process (``benchmarks/external.py``);
e2. de-identification (``benchmarks/deidentify.py``): 300 CT instances of 0.5 MB through plain
   pydicom read + write, dicognito and the project's Deidentifier, one core each, best of 5 rounds;
f. ``results.md`` (targets table first), ``results.json`` and ``results.png`` next to ``--out``.

``--quick`` is a smoke run (a 3 MB cohort, default association counts only, the WAN section's
DCMTK and default rows only, discovery over 20 patients, a 50-row request file,
no scale): it proves the harness works, its figures mean nothing. A variant that fails or misses an instance is reported as such in the table and makes
the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import dcmtk, deidentify, external, machine, report, wan  # noqa: E402
from benchmarks.archiving import run_archiving  # noqa: E402
from benchmarks.cohorts import BenchCohorts, Cohort, bench_cohorts  # noqa: E402
from benchmarks.large_instance import run_large_instance  # noqa: E402
from benchmarks.measure import environment, run_child, settle_disk  # noqa: E402
from benchmarks.orthanc_site import Site, load_directory, start_site  # noqa: E402
from benchmarks.profile import profile_one_association  # noqa: E402
from benchmarks.project import ProjectVariant, run_project_variant  # noqa: E402
from benchmarks.results import REFERENCE_KEY, RetrievalRow, archiving_dict, dcmtk_row, project_row  # noqa: E402
from dicom_assets.config import PacsSettings  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
SECTIONS = ("retrieval", "wan", "archiving", "large-instance", "discovery", "request-file", "scale", "deidentify")
#: Sections run by benchmarks/external.py: --skip name -> its name there (and key in results.json).
EXTERNAL_SECTIONS = {"discovery": "discovery", "request-file": "request_file", "scale": "scale"}
#: Series the DCMTK rows with Nagle on retrieve (of the cohort's 16).
NAGLE_SERIES = 2
#: Seconds of pause after ``sync`` before each retrieval variant (0 in ``--quick``: 3 MB).
SETTLE_S = 1.0
#: Association counts tried besides the default, to find the project's best setting.
OTHER_ASSOCIATIONS = (1, 2, 4)  # fixed counts (adaptive off) next to the adaptive default
#: The project's retrieve methods: DIMSE C-MOVE and C-GET, and WADO-RS (pacs.protocol: dicomweb).
PROJECT_METHODS = ("c-move", "c-get", "wado-rs")


class Progress:
    """``[  12.3 s] message`` lines on stdout, flushed at once (make shows them as they come)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f} s] {message}", flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny cohort, default settings only, 20-patient discovery, 50-row request file, no scale (smoke run)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results.md", help="the Markdown report (JSON and PNG go next to it)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench-work", help="cohort cache and the run's scratch files (default: bench-work/)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("DATABASE_URL") or DEFAULT_PG,
                        help="PostgreSQL server URL allowed to create databases (default: $DATABASE_URL or 127.0.0.1:5432)")  # fmt: skip
    parser.add_argument("--skip", action="append", choices=SECTIONS, default=[], help="leave a section out (repeatable)")
    return parser.parse_args(argv)


# -- retrieval ------------------------------------------------------------------------------------


def project_variants(quick: bool) -> list[ProjectVariant]:
    """C-MOVE, C-GET and WADO-RS at the config's default association (request) count, and (full run) at others."""
    default = int(PacsSettings.model_fields["max_concurrent_associations"].default)
    counts = [default] if quick else [default, *(n for n in OTHER_ASSOCIATIONS if n != default)]
    fixed = (("adaptive_concurrency", False),)  # the other counts are fixed; the default one adapts up to its ceiling
    return [ProjectVariant(method, n, n == default, () if n == default else fixed) for method in PROJECT_METHODS for n in counts]


def _attempt(row: RetrievalRow, measure: Callable[[], RetrievalRow], failures: list[str], log: Callable[[str], None]) -> RetrievalRow:
    """Run one variant; a failure or a missing instance is recorded on the row and said loudly."""
    try:
        row = measure()
    except Exception as exc:  # noqa: BLE001 - one broken variant must not cost the others
        row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"[:4000]
        traceback.print_exc()
    if row.status != "ok":
        failures.append(f"retrieval {row.label}: {row.reason.splitlines()[0] if row.reason else 'failed'}")
        log(f"FAILED {row.label}: {row.reason}")
    elif not row.complete:
        failures.append(f"retrieval {row.label}: {row.instances} of {row.expected_instances} instances on disk")
        log(f"FAILED {row.label}: only {row.instances} of {row.expected_instances} instances on disk")
    else:
        log(
            f"{row.label}: {row.mb_per_s:.1f} MB/s, {row.instances_per_s:.0f} inst/s, {row.seconds:.1f} s, "
            f"CPU {row.cpu_s or 0:.1f} s, peak RSS {row.peak_rss_mb or 0:.0f} MB"
        )
    return row


def _dcmtk_variant(site: Site, cohort: Cohort, base: Path, method: str, nodelay: bool, failures: list[str], log: Callable[[str], None],
                   series_count: int | None = None) -> RetrievalRow:
    """``series_count``: only the cohort's first series (the Nagle rows: ~11 MB/s whatever the size)."""
    how = "TCP_NODELAY=1" if nodelay else "Nagle on (no TCP_NODELAY)"
    series = cohort.series[:series_count] if series_count else cohort.series
    expected = sum(len(s.sop_instance_uids) for s in series)
    if method == "c-move":
        key, label, assoc = f"dcmtk-move-{'nodelay' if nodelay else 'nagle'}", f"DCMTK movescu + storescp +B, {how}", "1"
        retrieve = dcmtk.move_with_storescp
    else:
        key, label, assoc = f"dcmtk-get-{'nodelay' if nodelay else 'nagle'}", f"DCMTK getscu +B (one per series), {how}", "1 per series"
        retrieve = dcmtk.get_with_getscu
    directory = base / key
    if series_count:
        label += f" ({len(series)} of the {len(cohort.series)} series)"
    row = RetrievalRow(key, label, "dcmtk", method, assoc, expected)

    def measure() -> RetrievalRow:
        settle_disk(SETTLE_S)
        try:
            result = retrieve(site, series, directory / "received", directory / "logs", nodelay)
        finally:
            shutil.rmtree(directory / "received", ignore_errors=True)
        return dcmtk_row(key, label, method, assoc, expected, result)

    return _attempt(row, measure, failures, log)


def _project_variant(site: Site, cohort: Cohort, base: Path, variant: ProjectVariant, pg: str, failures: list[str], log: Callable[[str], None]) -> RetrievalRow:
    key = f"project-{variant.method}-{variant.associations}"
    directory = base / key
    row = RetrievalRow(key, variant.label, "dicom-assets", variant.method, str(variant.associations), cohort.instances)

    def measure() -> RetrievalRow:
        settle_disk(SETTLE_S)
        try:
            result = run_project_variant(site, variant, directory, pg, "^" + cohort.spec.patient_id_prefix)
        finally:
            for bulky in ("downloads", "archives"):
                shutil.rmtree(directory / bulky, ignore_errors=True)
        return project_row(key, variant, cohort.instances, result)

    return _attempt(row, measure, failures, log)


def _faster(a: RetrievalRow, b: RetrievalRow) -> RetrievalRow:
    """The better of two runs of one variant: complete first, then MB/s."""
    return max(a, b, key=lambda r: (r.complete, r.mb_per_s))


def run_retrieval(site: Site, cohort: Cohort, base: Path, pg: str, quick: bool, failures: list[str], log: Callable[[str], None]) -> list[RetrievalRow]:
    # DCMTK with TCP_NODELAY is the reference: it runs before and after the project's variants
    # and keeps its faster run, so neither a cold Orthanc nor a busy moment counts against it.
    # The project's one-association and defaults rows, whose targets are DCMTK's figure, get the
    # same two runs (the second after DCMTK's second) and keep the faster.
    first = [_dcmtk_variant(site, cohort, base, m, True, failures, log) for m in ("c-move", "c-get")]
    variants = project_variants(quick)
    ours = [_project_variant(site, cohort, base, v, pg, failures, log) for v in variants]
    again = first if quick else [_dcmtk_variant(site, cohort, base, m, True, failures, log) for m in ("c-move", "c-get")]
    if not quick:
        for i, v in enumerate(variants):
            if (v.associations == 1 or v.default) and v.method in ("c-move", "c-get"):
                ours[i] = _faster(ours[i], _project_variant(site, cohort, base, v, pg, failures, log))
    rows = [_faster(a, b) for a, b in zip(first, again)] + ours
    # Nagle on: ~11 MB/s whatever the size (a 40 ms delayed ACK per instance); 2 series tell it
    # in seconds where the whole cohort took 95 s each.
    rows += [_dcmtk_variant(site, cohort, base, m, False, failures, log, NAGLE_SERIES) for m in ("c-move", "c-get")]
    for method in PROJECT_METHODS:
        ours = [r for r in rows if r.tool == "dicom-assets" and r.method == method and r.complete]
        if ours:
            max(ours, key=lambda r: r.mb_per_s).best = True
    assert rows[0].key == REFERENCE_KEY
    return rows


def _profile(site: Site, cohort: Cohort, base: Path, pg: str, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The one-association C-MOVE sync once more, under py-spy (benchmarks/profile.py)."""
    if quick:
        return _not_run("--quick")
    log("profile: dicom-assets sync c-move, 1 assoc, under py-spy")
    try:
        result = profile_one_association(site, base / "profile-c-move-1", pg, "^" + cohort.spec.patient_id_prefix)
    except Exception as exc:  # noqa: BLE001 - the profile explains a figure; it must not cost the run
        traceback.print_exc()
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    log(f"profile: {result.get('status')} {result.get('mb_per_s', '')} MB/s under py-spy")
    return result


def _wan(run_dir: Path, work_dir: Path, pg: str, quick: bool, failures: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Section 1b, retrieval over a WAN: ``python -m benchmarks.wan`` in a child process (its own
    Orthanc and proxies; a crash there costs this section only); its log is ``wan.log``."""
    out, directory = run_dir / "wan.json", run_dir / "wan"
    log("wan: retrieval over 20 ms RTT (benchmarks/wan.py in a child process, log in wan.log)")
    argv = [sys.executable, "-m", "benchmarks.wan", str(out), "--work-dir", str(work_dir), "--run-dir", str(directory), "--pg-admin-url", pg]
    usage = run_child(argv + (["--quick"] if quick else []), run_dir / "wan.log", environment(), cwd=REPO_ROOT, timeout_s=wan.TIMEOUT_S)
    if not out.is_file():
        result: dict[str, Any] = {"status": "failed", "figures": {}, "reason": f"exit status {usage.returncode}, no result\n{usage.log_tail(15)}"}
    else:
        result = json.loads(out.read_text())
    failures.extend(wan.failures(result))
    for row in (result.get("figures") or {}).get("rows", []):
        if row["status"] == "ok" and row["complete"]:
            log(f"wan {row['label']}: {row['mb_per_s']:.1f} MB/s, {row['seconds']:.1f} s, peak {row['peak_assoc_pacs']} concurrent")
    log(f"wan: {result['status']} in {usage.wall_s:.0f} s" + ("" if result["status"] == "ok" else f" ({report._why(result)})"))
    return result


# -- the run --------------------------------------------------------------------------------------


def _not_run(reason: str) -> dict[str, Any]:
    return {"status": "not run", "figures": {}, "reason": reason}


def _prepare_cohorts(work_dir: Path, quick: bool, log: Callable[[str], None]) -> BenchCohorts:
    log(f"cohort: generating or reusing under {work_dir}")
    cohorts = bench_cohorts(work_dir, quick)
    for name, c in (("retrieval", cohorts.retrieval), ("archiving", cohorts.archive_patient)):
        log(f"cohort ({name}): {c.describe()} ({'generated now' if c.generated_now else 'cached'})")
    return cohorts


def _load_site(run_dir: Path, cohort: Cohort, results: dict[str, Any], log: Callable[[str], None]) -> Site:
    site = start_site(run_dir / "orthanc", dicomweb=True)
    web = f", DICOMweb {site.dicomweb_url}" if site.orthanc.dicomweb else ", no DICOMweb plugin"
    log(f"Orthanc on 127.0.0.1:{site.dicom_port} (HTTP {site.orthanc.http_port}{web}); loading {cohort.instances} instances over REST")
    started = time.monotonic()
    loaded = load_directory(site, cohort.dicom_dir)
    seconds = time.monotonic() - started
    if loaded != cohort.instances or site.orthanc.instance_count() != cohort.instances:
        raise RuntimeError(f"Orthanc holds {site.orthanc.instance_count()} instances, the cohort has {cohort.instances}")
    results["cohort"].update(orthanc_load_s=round(seconds, 2), orthanc_load_mb_per_s=round(cohort.bytes / 1e6 / seconds, 1))
    log(f"loaded in {seconds:.1f} s ({cohort.bytes / 1e6 / seconds:.0f} MB/s)")
    return site


def _stop_site(site: Site) -> None:
    site.orthanc.stop()
    for bulky in ("storage", "index"):  # 1 GB of Orthanc storage; its log stays
        shutil.rmtree(site.orthanc.root / bulky, ignore_errors=True)


def _archiving(cohort: Cohort, run_dir: Path, pg: str, failures: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    log(f"archiving: {cohort.describe()}")
    try:
        result = archiving_dict(run_archiving(cohort, run_dir / "archiving", pg))
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        failures.append(f"archiving: {type(exc).__name__}: {exc}")
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        for bulky in ("downloads", "archives"):
            shutil.rmtree(run_dir / "archiving" / bulky, ignore_errors=True)
        for leftover in (run_dir / "archiving").glob("*.zip"):
            leftover.unlink()
    for r in result["runs"]:
        log(f"{r['label']}: {r['mb_per_s']:.1f} MB/s, ratio {r['ratio']:.3f}, {r['seconds']:.1f} s, CPU {r['cpu_s']:.1f} s")
        if r.get("readable_by_unzip") is False:
            failures.append(f"archiving: unzip -tq rejects {r['label']}'s zip")
    return {"status": "ok", **result}


def _large_instance(work_dir: Path, run_dir: Path, pg: str, quick: bool, failures: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    log("large instance: generating or reusing it, then archiving and retrieving it")
    directory = run_dir / "large-instance"
    try:
        result = run_large_instance(work_dir, directory, pg, quick)
    except Exception as exc:  # noqa: BLE001 - e.g. no disk for the instance: the other sections go on
        traceback.print_exc()
        failures.append(f"large instance: {type(exc).__name__}: {exc}")
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    log(f"large instance: {result['instance']} ({'generated now' if result['generated_now'] else 'cached'})")
    for part in ("archive", "retrieval"):
        figures = result[part]
        if figures["status"] != "ok":
            failures.append(f"large instance {part}: {(figures.get('reason') or 'failed').splitlines()[0]}")
            log(f"FAILED large instance {part}: {figures.get('reason')}")
        else:
            log(f"large instance {part}: {figures['mb_per_s']:.1f} MB/s, {figures['seconds']:.1f} s, peak RSS {figures['peak_rss_mb']:.0f} MB")
    if result["archive"].get("readable_by_unzip") is False:
        failures.append("large instance: unzip -tq rejects the archive")
    return result


def _external(section: str, run_dir: Path, work_dir: Path, pg: str, quick: bool, failures: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    log(f"{section}: running benchmarks/{section}.py in a child process")
    result = external.run_section(section, run_dir, work_dir, pg, quick)
    if result.status == "failed":
        failures.append(f"{section}: {result.summary or 'failed'}")
    log(f"{section}: {result.status} in {result.seconds:.0f} s" + (f" ({result.summary})" if result.summary else ""))
    return result.as_dict()


def _deidentify(work_dir: Path, run_dir: Path, quick: bool, failures: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """pydicom, dicognito and the project's Deidentifier on the same files, one core (benchmarks/deidentify.py)."""
    try:
        result = deidentify.run_deidentify(work_dir, run_dir / "deidentify", quick, log=log)
    except Exception as exc:  # noqa: BLE001 - the other sections' figures stand without this one
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    failures.extend(deidentify.failures(result))
    ratio = result.get("ratio_vs_dicognito")
    log(f"deidentify: {result['status']}" + (f", {ratio:.2f}x dicognito" if ratio is not None else ", no ratio (a contender did not run)"))
    return result


def run(args: argparse.Namespace) -> int:
    global SETTLE_S
    SETTLE_S = 0.0 if args.quick else SETTLE_S
    log = Progress()
    work_dir = args.work_dir.resolve()
    run_dir = work_dir / "last-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    pg = args.pg_admin_url
    failures: list[str] = []
    results: dict[str, Any] = {
        "date": machine.now_utc(),
        "quick": args.quick,
        "machine": machine.machine(),
        "versions": machine.versions(pg),
        "load_average": {"start": machine.load_average()},
        "failures": failures,
    }
    log(f"machine: {results['machine']}; load average {results['load_average']['start']}")
    cohorts = _prepare_cohorts(work_dir, args.quick, log)
    results["cohort"] = {
        "retrieval": cohorts.retrieval.describe(),
        "archive_patient": cohorts.archive_patient.describe(),
        "generated_now": cohorts.retrieval.generated_now or cohorts.archive_patient.generated_now,
    }
    results["retrieval"] = []
    if "retrieval" not in args.skip:
        site = _load_site(run_dir, cohorts.retrieval, results, log)
        try:
            rows = run_retrieval(site, cohorts.retrieval, run_dir / "retrieval", pg, args.quick, failures, log)
            results["retrieval_profile"] = _profile(site, cohorts.retrieval, run_dir / "retrieval", pg, args.quick, log)
        finally:
            _stop_site(site)
        results["retrieval"] = [r.as_dict() for r in rows]
    results["wan"] = _not_run("--skip") if "wan" in args.skip else _wan(run_dir, work_dir, pg, args.quick, failures, log)
    results["archiving"] = _not_run("--skip") if "archiving" in args.skip else _archiving(cohorts.archive_patient, run_dir, pg, failures, log)
    results["large_instance"] = (
        _not_run("--skip") if "large-instance" in args.skip else _large_instance(work_dir, run_dir, pg, args.quick, failures, log)
    )
    for name, section in EXTERNAL_SECTIONS.items():
        if name in args.skip:
            results[section] = _not_run("--skip")
        elif args.quick and section == "scale":
            results[section] = _not_run("--quick (full size only: a 1,000,000-series state DB)")
        else:
            results[section] = _external(section, run_dir, work_dir, pg, args.quick, failures, log)
    results["deidentify"] = _not_run("--skip") if "deidentify" in args.skip else _deidentify(work_dir, run_dir, args.quick, failures, log)
    results["load_average"]["end"] = machine.load_average()
    results["duration_s"] = round(log.elapsed, 1)
    md, js, png = report.write_report(results, args.out)
    log(f"wrote {md}, {js}" + (f", {png}" if png else f" (no chart: {results.get('notes')})"))
    print(report.targets_table(results), flush=True)
    if failures:
        print("\nBENCHMARK FAILURES:\n" + "\n".join(f"  * {f}" for f in failures), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
