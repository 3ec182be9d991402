"""Discovery, request file and scale: benchmarks that live in their own modules, run in a child
process each.

``benchmarks/discovery.py``, ``benchmarks/request_file.py`` and ``benchmarks/scale.py`` are
written separately; this runner imports whichever exists, calls its entry point and writes the
figures as JSON, so a crash or a missing module there costs one section ("not run" with the
reason), never the whole run.

    python -m benchmarks.external discovery|request_file|scale OUT.json [--pg-admin-url URL] [--work-dir DIR] [--quick]

Discovery and request file get the work directory (their cohorts, 2,000 and 1,010 patients, are
cached there, next to ours) and a fresh PostgreSQL state DB; ``--quick`` runs them with 20
patients and a 50-row file (``QUICK_PATIENTS``). Scale has no small size, so the harness does not
run it with ``--quick``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.measure import environment, run_child

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"

#: Section -> (module, entry points tried in order). The first that exists is called.
ENTRY_POINTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "discovery": ("benchmarks.discovery", ("benchmark_discovery", "run_discovery_benchmark")),
    "request_file": ("benchmarks.request_file", ("benchmark_request_file",)),
    "scale": ("benchmarks.scale", ("run_scale_benchmark",)),
}
TIMEOUT_S = {"discovery": 600.0, "request_file": 600.0, "scale": 900.0}
#: ``patients`` given to a section's entry point under ``--quick`` (the request file: its rows).
QUICK_PATIENTS = {"discovery": 20, "request_file": 50}


@dataclass(frozen=True)
class SectionResult:
    """``status``: "ok" (``figures`` filled), "not run" or "failed" (``reason`` says why)."""

    name: str
    status: str
    figures: dict[str, Any]
    reason: str = ""
    seconds: float = 0.0

    @property
    def summary(self) -> str:
        """One line: the exception line of a traceback (not SQLAlchemy's trailing link), else the first line."""
        lines = [line.strip() for line in self.reason.strip().splitlines() if line.strip()]
        errors = [line for line in lines if _EXCEPTION_LINE.match(line)]
        return (errors[-1] if errors else lines[0] if lines else "")[:300]

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "summary": self.summary, "figures": self.figures, "reason": self.reason, "seconds": round(self.seconds, 1)}


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt|Exit)\b.*")


def _entry_point(section: str) -> Callable[..., dict[str, Any]]:
    """The section's function; ModuleNotFoundError/LookupError say why there is none."""
    module_name, names = ENTRY_POINTS[section]
    module = importlib.import_module(module_name)
    for name in names:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    raise LookupError(f"{module_name} has none of {', '.join(names)}")


def _call(section: str, pg_admin_url: str | None, work_dir: Path, quick: bool) -> dict[str, Any]:
    """Call the entry point with the arguments its signature takes (the modules are still moving)."""
    from benchmarks.project import scratch_database

    fn = _entry_point(section)
    accepted = inspect.signature(fn).parameters
    if section == "scale":
        return dict(fn(**({"pg_admin_url": pg_admin_url} if "pg_admin_url" in accepted else {})))
    with scratch_database(pg_admin_url or DEFAULT_PG) as database_url:
        offered = {"work_dir": work_dir, "database_url": database_url, "patients": QUICK_PATIENTS.get(section) if quick else None}
        return dict(fn(**{k: v for k, v in offered.items() if k in accepted and v is not None}))


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.external")
    parser.add_argument("section", choices=sorted(ENTRY_POINTS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--pg-admin-url")
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    try:
        figures = _call(args.section, args.pg_admin_url, args.work_dir, args.quick)
        result = {"status": "ok", "figures": figures}
    except ModuleNotFoundError as exc:
        if exc.name != ENTRY_POINTS[args.section][0]:
            raise
        result = {"status": "not run", "reason": f"{exc.name.replace('.', '/')}.py does not exist yet"}
    except LookupError as exc:
        result = {"status": "not run", "reason": str(exc)}
    except BaseException:
        result = {"status": "failed", "reason": traceback.format_exc(limit=8)[-3000:]}
    args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["status"] != "failed" else 1


def run_section(section: str, run_dir: Path, work_dir: Path, pg_admin_url: str | None, quick: bool = False) -> SectionResult:
    """Run one section in a child interpreter (repo root as cwd) and read its JSON back.

    ``run_dir`` gets its result and log, ``work_dir`` is the benchmark's cache (cohorts).
    """
    out = run_dir / f"{section}.json"
    out.unlink(missing_ok=True)
    repo_root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "benchmarks.external", section, str(out), "--work-dir", str(work_dir)]
    if pg_admin_url:
        argv += ["--pg-admin-url", pg_admin_url]
    if quick:
        argv.append("--quick")
    usage = run_child(argv, run_dir / f"{section}.log", environment(), cwd=repo_root, timeout_s=TIMEOUT_S[section])
    if not out.is_file():
        return SectionResult(section, "failed", {}, f"exit status {usage.returncode}, no result\n{usage.log_tail(15)}", usage.wall_s)
    data = json.loads(out.read_text())
    return SectionResult(section, data["status"], data.get("figures") or {}, data.get("reason", ""), usage.wall_s)


if __name__ == "__main__":
    sys.exit(child_main())
