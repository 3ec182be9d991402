"""Discovery and scale: benchmarks that live in their own modules, run in a child process each.

``benchmarks/discovery.py`` and ``benchmarks/scale.py`` are written separately; this runner
imports whichever exists, calls its entry point and writes the figures as JSON, so a crash or
a missing module there costs one section ("not run" with the reason), never the whole run.

    python -m benchmarks.external discovery|scale OUT.json [--pg-admin-url URL]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.measure import environment, run_child

#: Section -> (module, entry points tried in order). The first that exists is called.
ENTRY_POINTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "discovery": ("benchmarks.discovery", ("run_discovery_benchmark", "discovery_benchmark", "run_benchmark")),
    "scale": ("benchmarks.scale", ("run_scale_benchmark",)),
}
TIMEOUT_S = {"discovery": 600.0, "scale": 900.0}


@dataclass(frozen=True)
class SectionResult:
    """``status``: "ok" (``figures`` filled), "not run" or "failed" (``reason`` says why)."""

    name: str
    status: str
    figures: dict[str, Any]
    reason: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "figures": self.figures, "reason": self.reason, "seconds": round(self.seconds, 1)}


def _entry_point(section: str) -> Callable[..., dict[str, Any]]:
    """The section's function; ModuleNotFoundError/LookupError say why there is none."""
    module_name, names = ENTRY_POINTS[section]
    module = importlib.import_module(module_name)
    for name in names:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    raise LookupError(f"{module_name} has none of {', '.join(names)}")


def _call(section: str, pg_admin_url: str | None) -> dict[str, Any]:
    fn = _entry_point(section)
    if section == "scale":
        return dict(fn(pg_admin_url=pg_admin_url))
    return dict(fn())


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.external")
    parser.add_argument("section", choices=sorted(ENTRY_POINTS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--pg-admin-url")
    args = parser.parse_args(argv)
    try:
        figures = _call(args.section, args.pg_admin_url)
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


def run_section(section: str, work_dir: Path, pg_admin_url: str | None) -> SectionResult:
    """Run one section in a child interpreter (repo root as cwd) and read its JSON back."""
    out = work_dir / f"{section}.json"
    out.unlink(missing_ok=True)
    repo_root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "benchmarks.external", section, str(out)]
    if pg_admin_url:
        argv += ["--pg-admin-url", pg_admin_url]
    usage = run_child(argv, work_dir / f"{section}.log", environment(), cwd=repo_root, timeout_s=TIMEOUT_S[section])
    if not out.is_file():
        return SectionResult(section, "failed", {}, f"exit status {usage.returncode}, no result\n{usage.log_tail(15)}", usage.wall_s)
    data = json.loads(out.read_text())
    return SectionResult(section, data["status"], data.get("figures") or {}, data.get("reason", ""), usage.wall_s)


if __name__ == "__main__":
    sys.exit(child_main())
