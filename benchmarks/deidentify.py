"""De-identification on one core: the project's Deidentifier against dicognito, same files, same run.

Issue 12's target: de-identification at least 2x dicognito, in instances/s and MB/s, on one core.
Three contenders read every file of a cached cohort (300 CT instances of 512x512 16-bit, ~0.5 MB
each, ``<work-dir>/cohort-<digest>`` like ``benchmarks/cohorts.py``) and write one file for each:

* ``pydicom``: plain ``dcmread`` + ``save_as``, nothing changed: the floor any pydicom-based
  de-identifier pays;
* ``dicognito``: ``Anonymizer().anonymize(ds)`` between the two (one Anonymizer for the run, as
  its documentation says for instances of the same patients), its default settings;
* ``dicom-assets``: ``Deidentifier(DeidOptions(), DeidKeys(secret)).deidentify_file`` with the
  defaults (Basic Profile + Retain Longitudinal Modified Dates) and each patient's pseudonym and
  date shift, computed before timing (the pipeline knows its patient before it opens a file).

Each contender runs in a child process pinned to one CPU (``os.sched_setaffinity``, the same CPU
for all), so a library that used threads could not borrow the second core; imports and set-up
are outside the timed loop. The inputs are read once before, so they are in the page cache for
everyone, and the outputs go to a tmpfs (``/dev/shm``, when it has room), so no figure includes
disk writeback. Rounds alternate the order and each contender keeps its fastest round (the machine is
shared; the slower rounds are noise, not the tool). Every output is counted and parsed, the
de-identified ones must not carry the original PatientID, and when ``dciodvfy`` is installed the
first output is IOD-checked against its original (``dicom_assets_tests/iod_check.py``).

A contender whose library is missing (dicognito outside the ``bench`` extra, or
``dicom_assets.deid`` before it exists) is "not run" with the reason, not a failure.

    python -m benchmarks.deidentify [--quick] [--work-dir bench-work] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO_ROOT = Path(__file__).resolve().parent.parent
#: key -> label, in the order of the first round.
CONTENDERS = {
    "pydicom": "pydicom dcmread + save_as (no change: the floor)",
    "dicognito": "dicognito Anonymizer().anonymize + save_as",
    "dicom-assets": "dicom-assets Deidentifier.deidentify_file",
}
DEFAULT_ROUNDS = 5
CHILD_TIMEOUT_S = 600.0
#: Not a secret: the benchmark only needs the keyed functions to run.
BENCH_SECRET = b"make bench: not a real secret"
TARGET_RATIO = 2.0

Transform = Callable[[Path, Path, str], None]


@dataclass
class ContenderRun:
    """One contender's round: ``status`` "ok", "not run" or "failed" (``reason`` says why)."""

    key: str
    label: str
    status: str
    reason: str = ""
    instances: int = 0
    bytes: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    cpu: int | None = None

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        lines = [line.strip() for line in self.reason.strip().splitlines() if line.strip()]
        return {**asdict(self), "summary": lines[-1][:300] if lines else "", "instances_per_s": round(self.instances_per_s, 1),
                "mb_per_s": round(self.mb_per_s, 1), "seconds": round(self.seconds, 3), "cpu_s": round(self.cpu_s, 3)}  # fmt: skip


# -- the cohort -----------------------------------------------------------------------------------


def deidentify_spec(quick: bool) -> Any:
    """Full: 3 patients x 2 series x 50 slices of 512x512 = 300 instances, ~158 MB. Quick: 6 of 64x64."""
    from dicom_assets.devpacs.cohort import CohortSpec

    if quick:
        return CohortSpec(patients=2, series_per_study=1, slices_per_series=3, rows=64, columns=64, patient_id_prefix="DEID", seed=12)
    return CohortSpec(patients=3, series_per_study=2, slices_per_series=50, rows=512, columns=512, patient_id_prefix="DEID", seed=12)


def manifest(cohort: Any) -> list[tuple[str, str]]:
    """(file, PatientID) for every instance, from the cohort's summary (no file is opened)."""
    return [
        (str(cohort.dicom_dir / s.study_instance_uid / s.series_instance_uid / f"{uid}.dcm"), s.patient_id)
        for s in cohort.series
        for uid in s.sop_instance_uids
    ]


def _warm_page_cache(files: Sequence[str]) -> int:
    """Read every input once so no contender pays for the disk; returns their total size."""
    total = 0
    for name in files:
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def bench_cpu() -> int:
    """The CPU every contender is pinned to: the last one this process may use."""
    return max(os.sched_getaffinity(0))


# -- the child: one contender, one round -----------------------------------------------------------


class NotAvailable(Exception):
    """The contender's library is not installed (or not written yet)."""


def _missing(exc: ImportError, package: str) -> bool:
    """True when ``exc`` is ``package`` itself (or one of its modules) missing, not an import
    error inside it: a broken de-identifier fails the run, an absent one is "not run"."""
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ModuleNotFoundError) and (name == package or name.startswith(package + "."))


def _pydicom_copy(_patients: Sequence[str]) -> Transform:
    import pydicom

    def transform(src: Path, dst: Path, _patient_id: str) -> None:
        pydicom.dcmread(src).save_as(dst)

    return transform


def _dicognito(_patients: Sequence[str]) -> Transform:
    import pydicom

    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError as exc:
        if not _missing(exc, "dicognito"):
            raise
        raise NotAvailable("dicognito is not installed (pip install -e '.[bench]')") from exc
    anonymizer = Anonymizer()

    def transform(src: Path, dst: Path, _patient_id: str) -> None:
        ds = pydicom.dcmread(src)
        anonymizer.anonymize(ds)
        ds.save_as(dst)

    return transform


def _ours(patients: Sequence[str]) -> Transform:
    try:
        from dicom_assets.deid.deidentify import Deidentifier
        from dicom_assets.deid.keys import DeidKeys
        from dicom_assets.deid.options import DeidOptions
    except ImportError as exc:
        if not _missing(exc, "dicom_assets.deid"):
            raise
        raise NotAvailable(f"dicom_assets.deid not available ({exc})") from exc
    keys = DeidKeys(BENCH_SECRET)
    deidentifier = Deidentifier(DeidOptions(), keys)
    per_patient = {pid: (keys.pseudonym(pid), keys.date_shift_days(pid)) for pid in set(patients)}

    def transform(src: Path, dst: Path, patient_id: str) -> None:
        pseudonym, shift = per_patient[patient_id]
        deidentifier.deidentify_file(src, dst, pseudonym, shift)

    return transform


TRANSFORMS: dict[str, Callable[[Sequence[str]], Transform]] = {"pydicom": _pydicom_copy, "dicognito": _dicognito, "dicom-assets": _ours}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_contender(key: str, files: Sequence[tuple[str, str]], out_dir: Path) -> dict[str, Any]:
    """Set the contender up, then time it over every file (wall and this process's CPU)."""
    transform = TRANSFORMS[key]([pid for _, pid in files])
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [(Path(src), out_dir / f"{i:06d}.dcm", pid) for i, (src, pid) in enumerate(files)]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for src, dst, pid in targets:
        transform(src, dst, pid)
    seconds, cpu_s = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {"status": "ok", "instances": len(targets), "seconds": seconds, "cpu_s": cpu_s}


def child_main(argv: Sequence[str]) -> int:
    """``child KEY MANIFEST.json OUT_DIR RESULT.json CPU``: pin, set up, time, write the figures."""
    key, manifest_file, out_dir, result_file, cpu = argv
    os.sched_setaffinity(0, {int(cpu)})
    files = [tuple(row) for row in json.loads(Path(manifest_file).read_text())]
    try:
        result = time_contender(key, files, Path(out_dir))
    except NotAvailable as exc:
        result = {"status": "not run", "reason": str(exc)}
    except Exception:  # noqa: BLE001 - reported as the contender's failure, the others go on
        result = {"status": "failed", "reason": traceback.format_exc(limit=6)[-3000:]}
    result["cpu"] = sorted(os.sched_getaffinity(0))
    Path(result_file).write_text(json.dumps(result))
    return 0


# -- the parent: rounds, checks, figures -----------------------------------------------------------


def _run_child(key: str, manifest_file: Path, out_dir: Path, run_dir: Path, cpu: int, total_bytes: int) -> ContenderRun:
    """One round of ``key`` in a child pinned to ``cpu``, writing into ``out_dir`` (its log and
    figures go to ``run_dir``)."""
    from benchmarks.measure import environment, run_child

    result_file = run_dir / f"{key}.json"
    result_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "benchmarks.deidentify", "child", key, str(manifest_file), str(out_dir), str(result_file), str(cpu)]
    usage = run_child(argv, run_dir / f"{key}.log", environment(), cwd=REPO_ROOT, timeout_s=CHILD_TIMEOUT_S)
    run = ContenderRun(key, CONTENDERS[key], "failed", cpu=cpu)
    if not result_file.is_file():
        run.reason = f"exit status {usage.returncode}, no result\n{usage.log_tail(15)}"
        return run
    data = json.loads(result_file.read_text())
    run.status, run.reason = data["status"], data.get("reason", "")
    if data.get("cpu") != [cpu]:
        run.status, run.reason = "failed", f"not pinned to CPU {cpu}: ran on {data.get('cpu')}"
    if run.status == "ok":
        run.instances, run.seconds, run.cpu_s, run.bytes = data["instances"], data["seconds"], data["cpu_s"], total_bytes
    return run


def check_outputs(key: str, files: Sequence[tuple[str, str]], out_dir: Path) -> str:
    """What is wrong with a contender's outputs; empty when every input has an output that parses
    (and, for a de-identifier, no longer carries its original PatientID)."""
    import pydicom

    outputs = sorted(out_dir.glob("*.dcm"))
    if len(outputs) != len(files):
        return f"{len(outputs)} output files for {len(files)} inputs"
    for (_, patient_id), out in zip(files, outputs):
        try:
            ds = pydicom.dcmread(out, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any parse error is the finding
            return f"{out.name} does not parse: {type(exc).__name__}: {exc}"
        if key != "pydicom" and str(ds.get("PatientID", "")) == patient_id:
            return f"{out.name} still has PatientID {patient_id!r}"
    return ""


def iod_check(original: str, output: Path) -> list[str] | None:
    """dciodvfy's new errors in ``output`` compared with ``original``; None without dciodvfy."""
    from dicom_assets_tests.iod_check import dciodvfy_binary, new_iod_errors

    if dciodvfy_binary() is None:
        return None
    return new_iod_errors(Path(original), output)


def _round_orders(rounds: int) -> list[list[str]]:
    """Each round starts with the next contender, so no one always runs first (cold) or last."""
    keys = list(CONTENDERS)
    starts = [r % len(keys) for r in range(rounds)]
    return [keys[start:] + keys[:start] for start in starts]


def output_root(run_dir: Path, total_bytes: int) -> Path:
    """Where the contenders write: a tmpfs (/dev/shm) with room for two copies when there is one,
    so ext4 writeback stalls (see the README's retrieval profile) are not part of any figure;
    else ``run_dir``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 3 * total_bytes:
        return Path(tempfile.mkdtemp(prefix="bench-deidentify-", dir=shm))
    return run_dir / "outputs"


def _one_round(order: Sequence[str], files: Sequence[tuple[str, str]], manifest_file: Path, out_root: Path, run_dir: Path,
               cpu: int, total_bytes: int, checks: dict[str, dict[str, Any]], log: Callable[[str], None]) -> list[ContenderRun]:  # fmt: skip
    """Every contender once; the first ``ok`` run of each is checked (outputs, IOD) into ``checks``."""
    runs = []
    for key in order:
        out_dir = out_root / key
        shutil.rmtree(out_dir, ignore_errors=True)
        run = _run_child(key, manifest_file, out_dir, run_dir, cpu, total_bytes)
        if run.status == "ok" and key not in checks:
            problem = check_outputs(key, files, out_dir)
            new_errors = iod_check(files[0][0], sorted(out_dir.glob("*.dcm"))[0]) if not problem else None
            checks[key] = {"problem": problem, "iod_new_errors": new_errors}
            if problem:
                run.status, run.reason = "failed", problem
        shutil.rmtree(out_dir, ignore_errors=True)
        log(f"deidentify: {key}: " + (f"{run.instances_per_s:.0f} inst/s, {run.mb_per_s:.1f} MB/s, CPU {run.cpu_s:.2f} s"
                                      if run.status == "ok" else f"{run.status}: {run.reason.strip().splitlines()[-1] if run.reason else ''}"))  # fmt: skip
        runs.append(run)
    return runs


def _best(key: str, runs: Sequence[ContenderRun], checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The contender's fastest ok round (or its first run, to say why not), with every round's rate."""
    mine = [r for r in runs if r.key == key]
    ok = [r for r in mine if r.status == "ok"]
    failed = [r for r in mine if r.status == "failed"]
    chosen = max(ok, key=lambda r: r.instances_per_s) if ok and not failed else (failed or mine)[0]
    row = chosen.as_dict()
    row["rounds_instances_per_s"] = [round(r.instances_per_s, 1) for r in ok]
    row["iod_new_errors"] = (checks.get(key) or {}).get("iod_new_errors")
    return row


def run_deidentify(work_dir: Path, run_dir: Path, quick: bool, rounds: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The section's figures (``results.json``'s ``deidentify``): cohort, CPU, one row per contender,
    the ratio of the project's instances/s to dicognito's."""
    from benchmarks.cohorts import cached_cohort

    rounds = rounds or (1 if quick else DEFAULT_ROUNDS)
    cohort = cached_cohort(work_dir, deidentify_spec(quick))
    files = manifest(cohort)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_file = run_dir / "manifest.json"
    manifest_file.write_text(json.dumps(files))
    total_bytes, cpu = _warm_page_cache([f for f, _ in files]), bench_cpu()
    log(f"deidentify: {len(files)} instances, {total_bytes / 1e6:.0f} MB ({'generated now' if cohort.generated_now else 'cached'}); "
        f"{rounds} round(s) on CPU {cpu}")  # fmt: skip
    checks: dict[str, dict[str, Any]] = {}
    out_root = output_root(run_dir, total_bytes)
    try:
        runs = [run for order in _round_orders(rounds) for run in _one_round(order, files, manifest_file, out_root, run_dir, cpu, total_bytes, checks, log)]
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    rows = [_best(key, runs, checks) for key in CONTENDERS]
    return {"status": "ok", "cohort": cohort.describe(), "instances": len(files), "bytes": total_bytes, "cpu": cpu, "rounds": rounds,
            "outputs_on": "tmpfs" if str(out_root).startswith("/dev/shm/") else "disk", "generated_now": cohort.generated_now,
            "runs": rows, "ratio_vs_dicognito": ratio_vs_dicognito(rows), "ratio_per_round": ratio_per_round(runs)}  # fmt: skip


def ratio_vs_dicognito(rows: Sequence[dict[str, Any]]) -> float | None:
    """The project's instances/s over dicognito's (the same files, so MB/s gives the same); None
    unless both ran."""
    by_key = {r["key"]: r for r in rows}
    ours, theirs = by_key.get("dicom-assets"), by_key.get("dicognito")
    if not ours or not theirs or ours["status"] != "ok" or theirs["status"] != "ok" or not theirs["instances_per_s"]:
        return None
    return round(ours["instances_per_s"] / theirs["instances_per_s"], 3)


def ratio_per_round(runs: Sequence[ContenderRun]) -> list[float]:
    """Ours ÷ dicognito within each round (the two ran minutes apart at most, so a busy machine
    slows both): the spread says how much to trust the best-of-rounds ratio."""
    ours = [r for r in runs if r.key == "dicom-assets"]
    theirs = [r for r in runs if r.key == "dicognito"]
    return [round(a.instances_per_s / b.instances_per_s, 2) for a, b in zip(ours, theirs)
            if a.status == b.status == "ok" and b.instances_per_s]  # fmt: skip


def failures(section: dict[str, Any]) -> list[str]:
    """What ``make bench`` counts as failed: a contender that crashed or wrote wrong files
    (a missing library is "not run", not a failure)."""
    if section.get("status") != "ok":
        return [f"deidentify: {(section.get('reason') or 'failed').strip().splitlines()[-1]}"]
    return [f"deidentify {r['key']}: {(r['reason'] or 'failed').strip().splitlines()[-1]}" for r in section["runs"] if r["status"] == "failed"]


# -- command line -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deidentify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 small instances, one round (smoke run)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench-work", help="cohort cache (default: bench-work/)")
    parser.add_argument("--rounds", type=int, help=f"rounds per contender (default {DEFAULT_ROUNDS}, --quick 1)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    work_dir = args.work_dir.resolve()
    section = run_deidentify(work_dir, work_dir / "deidentify-run", args.quick, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(section, indent=2) + "\n")
    from benchmarks import report

    print("\n".join(report.deidentify_section(section)))
    print("\n" + report.targets_markdown(report.deidentify_targets(section)))
    problems = failures(section)
    print("\n".join(problems), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
