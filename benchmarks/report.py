"""``results.md`` and ``results.png`` from a run's figures (the dict that is ``results.json``).

Rendering works from the JSON alone, so a report can be redrawn without measuring again:
``python -m benchmarks.report benchmarks/results.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from benchmarks.results import REFERENCE_KEY

NOT_MEASURED = "—"


@dataclass(frozen=True)
class Target:
    """One target of the issue: ``ratio`` is measured ÷ limit (met: >= 1 for a floor, <= 1 for a ceiling)."""

    name: str
    target: str
    measured: str
    ratio: float | None
    met: bool | None


def _num(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return NOT_MEASURED
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# -- targets --------------------------------------------------------------------------------------


def _floor(name: str, target: str, measured: str, value: float | None, limit: float) -> Target:
    if value is None:
        return Target(name, target, measured, None, None)
    return Target(name, target, measured, value / limit, value >= limit)


def _ceiling(name: str, target: str, measured: str, value: float | None, limit: float) -> Target:
    if value is None:
        return Target(name, target, measured, None, None)
    return Target(name, target, measured, value / limit, value <= limit)


def _retrieval_targets(rows: list[dict[str, Any]]) -> list[Target]:
    reference = next((r for r in rows if r["key"] == REFERENCE_KEY and r["complete"]), None)
    # The DCMTK targets compare DIMSE with DIMSE; WADO-RS has its own rows (and shares the RSS target).
    ours = [r for r in rows if r["tool"] == "dicom-assets" and r["complete"] and r["method"] in ("c-move", "c-get")]
    best = max(ours, key=lambda r: r["mb_per_s"], default=None)
    out = []
    if best and reference and reference["mb_per_s"] > 0:
        ratio = best["mb_per_s"] / reference["mb_per_s"]
        measured = f"{ratio:.2f}× ({best['mb_per_s']:.0f} vs {reference['mb_per_s']:.0f} MB/s; {best['label']})"
        out.append(_floor("Retrieval vs DCMTK movescu+storescp, TCP_NODELAY=1", "≥ 1.0×", measured, ratio, 1.0))
    else:
        out.append(Target("Retrieval vs DCMTK movescu+storescp, TCP_NODELAY=1", "≥ 1.0×", "not measured", None, None))
    # The same with one association on our side too (DCMTK's movescu uses one), and with the
    # defaults (adaptive, up to the default ceiling): what a user gets (issue 15: ≥ 1.3×).
    rows_of: tuple[tuple[str, float, Callable[[dict[str, Any]], bool]], ...] = (
        ("with one association", 1.0, lambda r: r["associations"] == "1"),
        ("with the defaults", 1.3, lambda r: r["label"].endswith("(default)")),
    )
    for name, limit, picks in rows_of:
        for method in ("c-move", "c-get"):
            row = next((r for r in ours if r["method"] == method and picks(r)), None)
            if row and reference and reference["mb_per_s"] > 0:
                ratio = row["mb_per_s"] / reference["mb_per_s"]
                out.append(_floor(
                    f"… {name} ({method.upper()})", f"≥ {limit:.1f}×",
                    f"{ratio:.2f}× ({row['mb_per_s']:.0f} vs {reference['mb_per_s']:.0f} MB/s)", ratio, limit,
                ))  # fmt: skip
    rss = [r["peak_rss_mb"] for r in rows if r["tool"] == "dicom-assets" and r["peak_rss_mb"]]
    peak = max(rss) if rss else None
    out.append(_ceiling("Peak RSS of a retrieving process (whole sync)", "≤ 300 MB", f"{_num(peak, 0)} MB", peak, 300.0))
    return out


def _archiving_targets(archiving: dict[str, Any]) -> list[Target]:
    runs = {r["key"]: r for r in archiving.get("runs", [])}
    ours, zip6 = runs.get("dicom-assets"), runs.get("zip-6")
    if not ours or not zip6:
        return [Target("Archiving", "≥ 20× zip -r -6, ratio ≥ 0.98×", "not measured", None, None)]
    speed = ours["mb_per_s"] / zip6["mb_per_s"] if zip6["mb_per_s"] else None
    ratio = ours["ratio"] / zip6["ratio"] if zip6["ratio"] else None
    return [
        _floor("Archiving throughput vs zip -r -6", "≥ 20×", f"{_num(speed, 1)}× ({ours['mb_per_s']:.0f} vs {zip6['mb_per_s']:.1f} MB/s)", speed, 20.0),
        _floor("Archive compression ratio vs zip -r -6", "≥ 0.98×", f"{_num(ratio, 3)}× ({ours['ratio']:.3f} vs {zip6['ratio']:.3f})", ratio, 0.98),
        Target("Archive readable by standard unzip (unzip -tq)", "passes", "passes" if ours.get("readable_by_unzip") else "FAILS",
               None, bool(ours.get("readable_by_unzip"))),
    ]  # fmt: skip


def _large_instance_targets(section: dict[str, Any]) -> list[Target]:
    """Peak RSS of the process archiving one multi-GB instance (benchmarks/large_instance.py)."""
    name, limit = "Peak RSS archiving a 2 GB instance", section.get("rss_target_mb", 300.0)
    archive = section.get("archive") or {}
    if archive.get("status") != "ok":
        return [Target(name, f"≤ {limit:.0f} MB", _why(archive or section), None, None)]
    peak = archive["peak_rss_mb"]
    measured = (f"{peak:,.0f} MB for {section.get('bytes', 0) / 1e6:,.0f} MB "
                f"(+{peak - archive['rss_before_mb']:,.0f} MB over the process's imports)")  # fmt: skip
    return [_ceiling(name, f"≤ {limit:.0f} MB", measured, peak, limit)]


def _why(section: dict[str, Any]) -> str:
    """``not run: <reason>`` / ``failed: <exception line>`` for a section without figures."""
    status = section.get("status", "not run")
    reason = section.get("summary") or ((section.get("reason") or "").strip().splitlines() or [""])[0]
    return f"{'**failed**' if status == 'failed' else status}: {reason}" if reason else status


def _discovery_targets(section: dict[str, Any]) -> list[Target]:
    f = section.get("figures") or {}
    if section.get("status") != "ok" or "first_requests" not in f:
        return [Target("Discovery requests (first pass; second pass)", "≤ studies + date windows; ≤ 5 %", _why(section), None, None)]
    windows = f.get("date_windows")
    cfinds = f.get("first_cfinds")
    studies = f.get("studies", 0)
    first = f["first_requests"]
    if windows is not None and cfinds is not None:
        # + 1: the PATIENT-level C-FIND the selection rule needs (one per pass, not per study)
        first_target = _ceiling(
            "Discovery, first pass: C-FINDs", "≤ 1 C-FIND per study + 1 per date window",
            f"{cfinds:,} C-FINDs = {studies:,} studies + {windows} date window(s) + 1 patient query "
            f"({first - cfinds} associations besides)", cfinds, studies + windows + 1,
        )
    else:
        first_target = Target("Discovery, first pass: PACS requests", "≤ 1 C-FIND per study + 1 per date window",
                              f"{first:,} (associations + C-FINDs) for {studies:,} studies (date windows not reported)", None, None)
    share = f["second_requests"] / first if first else None
    return [
        first_target,
        _ceiling("Discovery, second pass over an unchanged PACS", "≤ 5 % of the first pass's requests",
                 f"{f['second_requests']:,} requests = {_num(share * 100 if share is not None else None, 2)} %", share, 0.05),
    ]  # fmt: skip


def _request_file_targets(section: dict[str, Any]) -> list[Target]:
    """Issue 11's request file: one C-FIND per row and per study on the first pass, next to
    nothing for an unchanged file, and only the new rows' and their studies' C-FINDs for an edit."""
    f = section.get("figures") or {}
    name = "Request file ({rows:,} rows), {what}"
    if section.get("status") != "ok" or "first_cfinds" not in f:
        return [Target("Request file (first pass; unchanged; 10 rows added)", "≤ rows + studies; ≤ 5 %; ≤ new rows + studies + 1",
                       _why(section), None, None)]  # fmt: skip
    rows, studies, added = f["rows"], f["studies"], f.get("added_rows", 0)
    first, second = f["first_requests"], f["second_requests"]
    share = second / first if first else None
    return [
        _ceiling(name.format(rows=rows, what="first pass: C-FINDs"), "≤ 1 C-FIND per row + 1 per study",
                 f"{f['first_cfinds']:,} C-FINDs for {rows:,} rows and {studies:,} studies "
                 f"({first - f['first_cfinds']} associations besides); {_num(f['first_seconds'], 1)} s",
                 f["first_cfinds"], rows + studies),
        _ceiling(name.format(rows=rows, what="unchanged second pass"), "≤ 5 % of the first pass's requests",
                 f"{second:,} requests ({f['second_cfinds']} C-FIND: the date window) = "
                 f"{_num(share * 100 if share is not None else None, 2)} %", share, 0.05),
        _ceiling(f"Request file, {added} rows added: C-FINDs", "≤ 1 per new row + 1 per new study + 1 date window",
                 f"{f['added_cfinds']:,} C-FINDs ({f['added_requests'] - f['added_cfinds']} associations besides)",
                 f["added_cfinds"], 2 * added + 1),
    ]  # fmt: skip


def _scale_targets(section: dict[str, Any]) -> list[Target]:
    f = section.get("figures") or {}
    if section.get("status") != "ok":
        return [Target("Scale (inventory, claim, sensor tick)", "≤ 60 s, ≤ 1 GB; ≤ 10 ms; ≤ 10 s", _why(section), None, None)]
    claims = {k: v for k, v in f.items() if k.startswith("claim") and k.endswith("_p95_ms")}
    worst_claim_key = max(claims, key=claims.get) if claims else None
    median = f.get(worst_claim_key.replace("_p95_ms", "_median_ms")) if worst_claim_key else None
    ticks = {k: v for k, v in f.items() if k.startswith("sensor") and k.endswith("_tick_s")}
    worst_tick_key = max(ticks, key=ticks.get) if ticks else None
    inv_s, inv_rss = f.get("inventory_s"), f.get("inventory_peak_rss_mb")
    rows = f.get("inventory_rows")
    return [
        _ceiling("Inventory time", "≤ 60 s", f"{_num(inv_s, 1)} s for {_num(rows)} series", inv_s, 60.0),
        _ceiling("Inventory peak RSS", "≤ 1 GB", f"{_num(inv_rss, 0)} MB", inv_rss, 1000.0),
        _ceiling("Claim the next series", "≤ 10 ms",
                 f"{_num(claims.get(worst_claim_key), 2)} ms p95, {_num(median, 2)} ms median (worst scenario: {worst_claim_key[:-7]})"
                 if worst_claim_key else "not reported",
                 claims.get(worst_claim_key) if worst_claim_key else None, 10.0),
        _ceiling("Sensor tick", "≤ 10 s",
                 f"{_num(ticks.get(worst_tick_key), 2)} s (slowest: {worst_tick_key})" if worst_tick_key else "not reported",
                 ticks.get(worst_tick_key) if worst_tick_key else None, 10.0),
    ]  # fmt: skip


def deidentify_targets(section: dict[str, Any]) -> list[Target]:
    """Issue 12: the project's de-identification at least twice dicognito's rate, one core, same files."""
    name, limit = "De-identification vs dicognito (one core, same files)", "≥ 2.0×"
    runs = {r["key"]: r for r in section.get("runs", [])}
    ratio = section.get("ratio_vs_dicognito")
    if section.get("status") != "ok" or ratio is None:
        missing = next((r for r in (runs.get("dicom-assets"), runs.get("dicognito")) if r and r["status"] != "ok"), None)
        return [Target(name, limit, _why(missing or section), None, None)]
    ours, theirs = runs["dicom-assets"], runs["dicognito"]
    measured = (f"{ratio:.2f}× ({ours['instances_per_s']:,.0f} vs {theirs['instances_per_s']:,.0f} instances/s, "
                f"{ours['mb_per_s']:,.0f} vs {theirs['mb_per_s']:,.0f} MB/s)")  # fmt: skip
    if section.get("note"):
        measured += "; measured on its own, see section 5"
    return [_floor(name, limit, measured, ratio, 2.0)]


def _wan_rows(section: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in (section.get("figures") or {}).get("rows", [])}


def _wan_faults(row: dict[str, Any]) -> tuple[int, int]:
    """(A7xx/C0xx statuses, resets) of one WAN row: statuses in its logs; resets seen by the
    proxies, recorded by the request budget, or counted as series network faults."""
    resets = int(row.get("proxy_resets") or 0) + int(row.get("budget_resets") or 0) + int(row.get("network_faults") or 0)
    return int(row.get("status_faults") or 0), resets


def wan_targets(section: dict[str, Any]) -> list[Target]:
    """Issue 15 over a WAN: the defaults ≥ 4× DCMTK's movescu loop and ≥ 0.9× the best fixed
    association count, with no A7xx/C0xx or reset caused (benchmarks/wan.py)."""
    f = section.get("figures") or {}
    rtt = f"Over {f.get('rtt_ms', 20):g} ms RTT"
    names = (f"{rtt}: retrieval defaults vs DCMTK movescu loop", f"{rtt}: defaults vs best fixed association count",
             f"{rtt}: A7xx/C0xx statuses and resets (defaults)")  # fmt: skip
    limits = (f"≥ {4.0:.1f}×", "≥ 0.9×", "0")
    if section.get("status") != "ok":
        return [Target(n, lim, _why(section), None, None) for n, lim in zip(names, limits)]
    rows = {k: r for k, r in _wan_rows(section).items() if r.get("complete")}
    ours, reference = rows.get("project-default"), rows.get("dcmtk-move")
    fixed = [r for r in rows.values() if r.get("group") == "fixed"]
    best = max(fixed, key=lambda r: r["mb_per_s"], default=None)
    out = []
    if ours and reference and reference["mb_per_s"]:
        ratio = ours["mb_per_s"] / reference["mb_per_s"]
        out.append(_floor(names[0], limits[0], f"{ratio:.2f}× ({ours['mb_per_s']:.1f} vs {reference['mb_per_s']:.1f} MB/s)", ratio, 4.0))
    else:
        out.append(Target(names[0], limits[0], "not measured (a row failed)", None, None))
    if ours and best and best["mb_per_s"]:
        ratio = ours["mb_per_s"] / best["mb_per_s"]
        out.append(_floor(names[1], limits[1], f"{ratio:.2f}× ({ours['mb_per_s']:.1f} vs {best['mb_per_s']:.1f} MB/s with "
                                               f"{best['associations']} assoc)", ratio, 0.9))  # fmt: skip
    else:
        why = "no fixed-count row in this run" if not any(r.get("group") == "fixed" for r in _wan_rows(section).values()) else "a row failed"
        out.append(Target(names[1], limits[1], f"not measured ({why})", None, None))
    if ours:
        statuses, resets = _wan_faults(ours)
        out.append(Target(names[2], limits[2], f"{statuses} A7xx/C0xx, {resets} resets", None, statuses == 0 and resets == 0))
    else:
        out.append(Target(names[2], limits[2], "not measured", None, None))
    return out


def wan_section(section: dict[str, Any]) -> list[str]:
    """Section 1b: retrieval over a WAN (10 ms one way on every path, the project's delay proxy)."""
    f = section.get("figures") or {}
    if section.get("status") != "ok" or "rows" not in f:
        return _section_figures(section)
    rows = _wan_rows(section)
    reference = rows.get("dcmtk-move") if (rows.get("dcmtk-move") or {}).get("complete") else None
    check = f.get("proxy_check") or {}
    rt, bulk = check.get("round_trip") or {}, check.get("throughput") or {}
    lines = [
        f"Orthanc on loopback behind the project's delay proxy (`dicom_assets_tests/delay_proxy.py`): **{f['delay_ms']:g} ms one "
        f"way on every path** ({f['rtt_ms']:g} ms round trip, no bandwidth cap, TCP_NODELAY on both sides): our associations "
        "(or HTTP connections) to the PACS, and the PACS's C-STORE associations back to our receiver (Orthanc's C-MOVE "
        f"destinations point at proxies in front of the receivers). Cohort: {f['cohort']} ({f['series']} series). "
        f"Orthanc serves up to {f.get('orthanc_dicom_threads') or 4} associations at once (`DicomThreadsCount`; its default, "
        "4, would keep the 8-association row at 4 C-MOVEs served at once).",
        "",
    ]
    if rt and bulk:
        lines += [f"The proxy alone: a one-byte round trip takes {rt['median_ms']:.2f} ms (median of {rt['count']}; min "
                  f"{rt['min_ms']:.2f}, max {rt['max_ms']:.2f}; a new connection's first one {rt['first_ms']:.2f} ms, the TCP "
                  f"handshake's round trip included); {bulk['megabytes']} MB pass through it at {bulk['mb_per_s']:,.0f} MB/s "
                  "(loopback, one connection), far above any row below.", ""]  # fmt: skip
    elif check.get("error"):
        lines += [f"The proxy alone: not measured ({check['error']}).", ""]
    body = []
    for r in rows.values():
        if r["status"] != "ok":
            body.append([r["label"], r["associations"], f"**FAILED**: {(r['reason'] or '').splitlines()[0][:120] if r['reason'] else ''}",
                         "", "", "", "", "", "", ""])  # fmt: skip
            continue
        got = f"{r['instances']:,}/{r['expected_instances']:,}" + ("" if r["complete"] else " **MISSING**")
        ratio = f"{r['mb_per_s'] / reference['mb_per_s']:.2f}×" if reference and r["complete"] and reference["mb_per_s"] else NOT_MEASURED
        statuses, resets = _wan_faults(r)
        receiver = NOT_MEASURED if r.get("peak_assoc_receiver") is None else str(r["peak_assoc_receiver"])
        body.append([
            r["label"], r["associations"], got, _num(r["seconds"], 1), f"**{r['mb_per_s']:.1f}**", ratio,
            f"{_num(r.get('requests_per_min_peak'))} ({_num(r.get('requests_per_min_retrieval'), 0)})",
            f"{_num(r.get('peak_assoc_pacs'))} / {receiver}", str(statuses), str(resets),
        ])  # fmt: skip
    for skip in f.get("skipped", []):
        body.append([skip["label"], "", f"*skipped*: {skip['note']}", "", "", "", "", "", "", ""])
    lines += _table(
        ["variant", "assoc / requests", "instances", "s", "MB/s", "× DCMTK", "requests per min: peak 60 s (rate in retrieval)",
         "peak concurrent: PACS path / receiver path", "A7xx/C0xx", "resets"], body,
    )  # fmt: skip
    wan_t = wan_targets(section)
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    lines += ["", "Targets (issue 15): " + "; ".join(
        f"{t.name.split(': ', 1)[-1]} {t.target}: {t.measured} ({verdict[t.met]})" for t in wan_t) + "."]  # fmt: skip
    lines += ["", "How: each row gets fresh proxies, a fresh state DB and an empty directory; the rows bound by each association's "
              "round trip (DCMTK's one series at a time, 1 and 2 fixed associations) retrieve the cohort's first patients only, as "
              "their labels say (their MB/s does not depend on the size; the whole cohort cost a minute each); the defaults row and the "
              "fixed rows of the whole cohort run twice and keep the faster (both runs' MB/s in the JSON, `runs_mb_per_s`); seconds and MB/s as in section 1 "
              "(the project: as `downloaded_series` recorded them; DCMTK: movescu's wall time). Requests: the project's are the "
              "grants of its request budget (`pacs_request_log`, read every 0.5 s while the sync runs: associations, C-FINDs, "
              "C-MOVEs; QIDO-RS/WADO-RS requests), \"peak 60 s\" is the most in any 60 s (the budget's window, "
              f"{f.get('budget_per_minute', '')} allowed), the rate is those sent during retrieval per minute; DCMTK's are its "
              "client's count (one association, one C-MOVE per series). Peak concurrent: most connections the proxies held open "
              "at once during retrieval (WADO-RS: HTTP connections, idle keep-alive ones of the pool included). A7xx/C0xx: log lines naming such a status; resets: seen by the proxies, recorded by the "
              "budget, or counted as a series' network fault."]  # fmt: skip
    return lines


def targets(results: dict[str, Any]) -> list[Target]:
    out = _retrieval_targets(results.get("retrieval", []))
    out += wan_targets(results.get("wan") or {"status": "not run", "reason": "not in this run"})
    out += _archiving_targets(results.get("archiving") or {})
    out += _large_instance_targets(results.get("large_instance") or {})
    out += _discovery_targets(results.get("discovery") or {})
    out += _request_file_targets(results.get("request_file") or {})
    out += _scale_targets(results.get("scale") or {})
    out += deidentify_targets(results.get("deidentify") or {"status": "not run", "reason": "not in this run"})
    minutes = results.get("duration_s", 0) / 60
    out.append(_ceiling("make bench wall time", "≤ 15 min", f"{minutes:.1f} min" + (" (--quick)" if results.get("quick") else ""), minutes, 15.0))
    return out


# -- Markdown -------------------------------------------------------------------------------------


def _met(t: Target) -> str:
    return NOT_MEASURED if t.met is None else ("yes" if t.met else "**no**")


def _retrieval_section(rows: list[dict[str, Any]]) -> list[str]:
    reference = next((r for r in rows if r["key"] == REFERENCE_KEY and r["complete"]), None)
    body = []
    for r in rows:
        ratio = f"{r['mb_per_s'] / reference['mb_per_s']:.2f}×" if reference and r["complete"] and reference["mb_per_s"] else NOT_MEASURED
        if r["status"] != "ok":
            body.append([r["label"], r["method"].upper(), r["associations"], f"**FAILED**: {r['reason'].splitlines()[0][:120] if r['reason'] else ''}", "", "", "", "", "", "", ""])
            continue
        got = f"{r['instances']:,}/{r['expected_instances']:,}" + ("" if r["complete"] else " **MISSING**")
        body.append([
            r["label"] + (" **best**" if r.get("best") else ""), r["method"].upper(), r["associations"], got,
            _num(r["bytes"] / 1e6, 0), _num(r["seconds"], 1), f"**{r['mb_per_s']:.1f}**", _num(r["instances_per_s"], 0),
            _num(r["cpu_s"], 1), _num(r["peak_rss_mb"], 0), ratio,
        ])  # fmt: skip
    lines = _table(
        ["variant", "method", "assoc / requests", "instances", "MB", "s", "MB/s", "inst/s", "CPU s", "peak RSS MB", "× DCMTK move (NODELAY)"], body
    )
    ours = [r for r in rows if r["tool"] == "dicom-assets" and r["status"] == "ok"]
    if ours:
        lines += ["", "The project's whole `dicom-assets sync` pass (discovery, retrieval, archive of every patient, validation, inventory):", ""]
        lines += _table(
            ["variant", "sync wall s", "sync CPU s", "peak RSS MB (whole sync)", "peak RSS MB (during retrieval, sampled)", "notes"],
            ([r["label"], _num(r["sync_wall_s"], 1), _num(r["sync_cpu_s"], 1), _num(r["peak_rss_mb"], 0),
              _num(r["retrieval_peak_rss_mb"], 0), "; ".join(r.get("notes") or []) or ""] for r in ours),
        )  # fmt: skip
    return lines


def _profile_section(profile: dict[str, Any]) -> list[str]:
    """Where the one-association C-MOVE's time went (benchmarks/profile.py)."""
    head = ["### Where one association's time goes (C-MOVE, 1 assoc, sampled by py-spy)", ""]
    if profile.get("status") != "ok":
        return head + [f"{profile.get('status', 'not run')}: {profile.get('reason', '')}"]
    rate, instances = profile["samples_per_s"], profile.get("instances") or 0
    lines = head + [
        f"The profiled run: {_num(profile.get('mb_per_s'), 1)} MB/s, {instances:,} instances in {_num(profile.get('seconds'), 2)} s "
        "(py-spy slows it a little). Shares of each thread's wall time, idle included; ms per instance = that time / instances.",
        "",
    ]
    for thread, caption in (("receiving", "receiving thread (storage SCP association)"), ("requesting", "requesting thread (C-MOVE)")):
        counts: dict[str, int] = profile.get(thread) or {}
        total = sum(counts.values())
        if not total:
            continue
        rows = sorted(counts.items(), key=lambda kv: -kv[1])
        lines += _table(
            [caption, "share", "s", "ms per instance"],
            ([name, f"{n / total:.0%}", _num(n / rate, 2), _num(n / rate * 1000 / instances, 2) if instances else NOT_MEASURED] for name, n in rows),
        )
        lines.append("")
    return lines


def _archiving_section(archiving: dict[str, Any]) -> list[str]:
    if archiving.get("status") == "failed":
        return [f"**FAILED**: {archiving.get('reason', '')}"]
    runs = archiving.get("runs", [])
    zip6 = next((r for r in runs if r["key"] == "zip-6"), None)
    lines = [
        f"Patient `{archiving.get('patient_id')}`: {archiving.get('instances', 0):,} instances, "
        f"{archiving.get('input_bytes', 0) / 1e6:.0f} MB (files in the page cache for every contender).",
        "",
    ]
    lines += _table(
        ["contender", "output MB", "s", "MB/s (input)", "ratio (in/out)", "CPU s", "× zip -6 MB/s", "× zip -6 ratio", "unzip -tq"],
        ([r["label"], _num(r["output_bytes"] / 1e6, 1), _num(r["seconds"], 2), f"**{r['mb_per_s']:.1f}**", _num(r["ratio"], 3),
          _num(r["cpu_s"], 1), f"{r['mb_per_s'] / zip6['mb_per_s']:.1f}×" if zip6 else NOT_MEASURED,
          f"{r['ratio'] / zip6['ratio']:.3f}×" if zip6 else NOT_MEASURED,
          NOT_MEASURED if r.get("readable_by_unzip") is None else ("ok" if r["readable_by_unzip"] else "**FAILS**")] for r in runs),
    )  # fmt: skip
    return lines


def _large_instance_section(section: dict[str, Any], archiving: dict[str, Any]) -> list[str]:
    """Archiving and retrieving one multi-GB instance, next to the small-member archiving figure."""
    if section.get("status") not in ("ok", "failed") or "archive" not in section:
        return [_why(section)]
    archive, retrieval = section["archive"], section.get("retrieval") or {}
    lines = [f"{section['instance'][0].upper()}{section['instance'][1:]}: {section['bytes'] / 1e6:,.0f} MB "
             f"({'generated in this run' if section.get('generated_now') else 'reused from bench-work/'}).", ""]  # fmt: skip
    rows = []
    if archive.get("status") == "ok":
        rows.append(["dicom-assets patient_archive (level 6, verified; child process)", _num(archive["seconds"], 2),
                     f"**{archive['mb_per_s']:.1f}**", _num(archive["ratio"], 3), _num(archive["cpu_s"], 1),
                     f"**{archive['peak_rss_mb']:,.0f}**", _num(archive["rss_before_mb"], 0),
                     "ok" if archive.get("readable_by_unzip") else "**FAILS**"])  # fmt: skip
    else:
        rows.append(["dicom-assets patient_archive", f"**FAILED**: {_why(archive)}", "", "", "", "", "", ""])
    if retrieval.get("status") == "ok":
        rows.append([f"{retrieval['label']} (whole sync: retrieval + archive + ...)", _num(retrieval["seconds"], 2),
                     f"**{retrieval['mb_per_s']:.1f}**", NOT_MEASURED, NOT_MEASURED, f"**{retrieval['peak_rss_mb']:,.0f}**",
                     NOT_MEASURED, f"RSS during retrieval {_num(retrieval.get('retrieval_peak_rss_mb'), 0)} MB"])  # fmt: skip
    elif retrieval:
        rows.append(["dicom-assets sync", f"**FAILED**: {_why(retrieval)}", "", "", "", "", "", ""])
    lines += _table(["step", "s", "MB/s", "ratio (in/out)", "CPU s", "peak RSS MB", "RSS before MB", "notes"], rows)
    small = next((r for r in archiving.get("runs", []) if r["key"] == "dicom-assets"), None)
    if small and archive.get("status") == "ok":
        lines += ["", f"Small members (section 2, {archiving.get('instances', 0):,} CT slices): **{small['mb_per_s']:.1f} MB/s**; "
                      f"this one instance: **{archive['mb_per_s']:.1f} MB/s** ({archive['mb_per_s'] / small['mb_per_s']:.2f}×)."]  # fmt: skip
    lines += ["", "Members above one zip chunk (8 MiB) are read and deflated in chunks by the same thread pool and written "
                  "with a data descriptor, so memory holds a few chunks per thread whatever the member's size. Peak RSS is "
                  "the child's own `VmHWM`; \"RSS before\" is what it held after its imports (Dagster, SQLAlchemy), before "
                  "archiving. The sync row's seconds and MB/s are its retrieval's, its peak RSS the whole sync's."]  # fmt: skip
    return lines


_PASS_CAPTIONS = {
    "first": "first (full): every row asked",
    "second": "second, file unchanged (incremental)",
    "added": "{added} rows added (incremental)",
    "full": "forced full pass (weekly), file unchanged",
}


def _request_file_section(section: dict[str, Any]) -> list[str]:
    """One line per pass of benchmarks/request_file.py: rows, what was asked, requests, seconds."""
    f = section.get("figures") or {}
    if section.get("status") != "ok" or "passes" not in f:
        return _section_figures(section)
    lines = [f"A {f['rows']:,}-row request file (one PatientID row per patient, IDs with leading zeros; 1 CT study of "
             f"1 series each) against the bundled PACS on loopback, fresh state DB; each pass is `discover_requested` "
             f"then the series step (discovery + series selection) in runs of 200 patients, as a sync runs them. "
             f"Requests are counted by the PACS.", ""]  # fmt: skip
    if section.get("note"):
        lines += [section["note"], ""]
    rows = []
    for p in f["passes"]:
        caption = _PASS_CAPTIONS.get(p["name"], p["name"]).format(added=f.get("added_rows", ""))
        rows.append([caption, _num(p["rows"]), _num(p["rows_asked"]), _num(p["patients"]), _num(p["studies_asked"]),
                     _num(p["associations"]), _num(p["cfinds"]), f"**{p['requests']:,}**", _num(p["resolve_seconds"], 2),
                     _num(p["series_seconds"], 2), _num(p["seconds"], 2)])  # fmt: skip
    lines += _table(["pass", "rows", "rows asked (STUDY C-FIND)", "patients", "studies asked (SERIES C-FIND)",
                     "associations", "C-FINDs", "requests", "resolve s", "series s", "s"], rows)  # fmt: skip
    lines += ["", "An incremental pass asks about new or edited rows only, plus one STUDY-level C-FIND of the date window "
                  "(StudyDate from the last pass minus `discovery.recheck_days`); a full pass asks about every row again "
                  "and asks series only of studies whose counts changed."]  # fmt: skip
    return lines


def deidentify_section(section: dict[str, Any]) -> list[str]:
    """One row per contender of benchmarks/deidentify.py (its fastest round), and how it was measured."""
    if section.get("status") != "ok" or "runs" not in section:
        return [_why(section)]
    theirs = next((r for r in section["runs"] if r["key"] == "dicognito" and r["status"] == "ok"), None)
    rows = []
    for r in section["runs"]:
        if r["status"] != "ok":
            rows.append([r["label"], _why(r), "", "", "", "", "", ""])
            continue
        iod = r.get("iod_new_errors")
        rows.append([r["label"], _num(r["seconds"], 2), f"**{r['instances_per_s']:,.0f}**", f"{r['mb_per_s']:,.1f}", _num(r["cpu_s"], 2),
                     f"{r['instances_per_s'] / theirs['instances_per_s']:.2f}×" if theirs else NOT_MEASURED,
                     ", ".join(f"{x:,.0f}" for x in r.get("rounds_instances_per_s", [])),
                     NOT_MEASURED if iod is None else (str(len(iod)) if not iod else f"**{len(iod)}**: {iod[0][:100]}")])  # fmt: skip
    lines = [f"{section['cohort']}; {section['rounds']} round(s), each contender in a child process pinned to CPU {section['cpu']}, "
             f"outputs on {section.get('outputs_on', 'disk')}.", ""]  # fmt: skip
    if section.get("note"):
        lines += [section["note"], ""]
    lines += _table(["contender", "s", "inst/s", "MB/s (input)", "CPU s", "× dicognito", "inst/s of each round", "new dciodvfy errors"], rows)
    per_round = section.get("ratio_per_round") or []
    if per_round:
        middle = statistics.median(per_round)
        lines += ["", f"dicom-assets ÷ dicognito within each round: {', '.join(f'{x:.2f}×' for x in per_round)} (median {middle:.2f}×)."]
    lines += ["", "Every contender reads each file and writes one file for it (imports and set-up not timed; inputs in the page "
                  "cache; outputs counted, parsed and, de-identified, checked for the original PatientID). The best of the rounds "
                  "counts; rounds alternate the order. \"New dciodvfy errors\": the first output against its original "
                  "(`dicom_assets_tests/iod_check.py`). dicognito runs with its defaults; the project with `DeidOptions()` (Basic "
                  "Profile + Retain Longitudinal Modified Dates)."]  # fmt: skip
    return lines


def _section_figures(section: dict[str, Any]) -> list[str]:
    status = section.get("status", "not run")
    if status != "ok":
        reason = (section.get("reason") or "").strip()
        first = section.get("summary") or (reason.splitlines()[0] if reason else "")
        lines = [f"**{status}**{': ' + first if first else ''}"]
        if status == "failed" and len(reason.splitlines()) > 1:
            lines += ["", "```", *reason.splitlines()[-12:], "```"]
        return lines
    figures = section.get("figures") or {}
    return _table(["figure", "value"], ([k, _figure(v)] for k, v in figures.items()))


def _figure(value: Any) -> str:
    """A figure as reported: floats with up to 3 decimals, no trailing zeros."""
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    return _num(value)


def targets_table(results: dict[str, Any]) -> str:
    """The Targets table (Markdown), also what the run prints at the end."""
    return targets_markdown(targets(results))


def targets_markdown(rows: Iterable[Target]) -> str:
    """Targets as the Markdown table of results.md (also for one section run on its own)."""
    cells = ([t.name, t.target, t.measured, NOT_MEASURED if t.ratio is None else f"{t.ratio:.2f}", _met(t)] for t in rows)
    return "\n".join(_table(["target", "limit", "measured", "measured ÷ limit", "met"], cells))


def render_markdown(results: dict[str, Any]) -> str:
    m, v, c = results.get("machine", {}), results.get("versions", {}), results.get("cohort", {})
    load = results.get("load_average", {})
    lines = [
        "# dicom_assets benchmark" + (" (--quick smoke run: tiny cohort, not representative)" if results.get("quick") else ""),
        "",
        f"{results.get('date', '')}, `make bench` (`python -m benchmarks.run`) in {results.get('duration_s', 0) / 60:.1f} min.",
        "",
        f"* **Machine**: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM, {m.get('kernel')}, {m.get('os')}; "
        f"load average (1/5/15 min) at start {load.get('start')}, at end {load.get('end')} (other work on the machine skews figures).",
        "* **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"* **Cohort** (retrieval): {c.get('retrieval')}; loaded into Orthanc over REST in {_num(c.get('orthanc_load_s'), 1)} s "
        f"({_num(c.get('orthanc_load_mb_per_s'), 0)} MB/s). **Archiving patient**: {c.get('archive_patient')}."
        + (" Generated in this run." if c.get("generated_now") else " Reused from the cache (bench-work/)."),
        "* **PACS**: Orthanc on 127.0.0.1 (SynchronousCMove, TcpNoDelay on, no storage compression), with its DICOMweb "
        "plugin: DIMSE and WADO-RS variants read the same storage.",
        "",
        "## Targets",
        "",
        targets_table(results),
        "",
        "## 1. Retrieval",
        "",
        *_retrieval_section(results.get("retrieval", [])),
        "",
        "How: every variant retrieves every series of the cohort into an empty directory (after `sync` and a 1 s pause, so the previous variant's writeback is not in its seconds), and its count of files is checked "
        "against the cohort. DCMTK (TCP_NODELAY) runs before and after the project's variants, and the project's one-association "
        "and defaults C-MOVE and C-GET run a second time after it: each of these keeps its faster run. "
        "`dicom-assets sync` runs with a fresh PostgreSQL state DB and Dagster home (archives stored, not deflated), without `TCP_NODELAY` in "
        "its environment; its MB/s, instances and seconds are what the `downloaded_series` asset recorded "
        "(`--json-summary`), its CPU s is the sync process's CPU between the start and end of retrieval (sampled every 0.05 s), "
        "its peak RSS is the whole sync process's (VmHWM). DCMTK: `storescp +B` (one process) with one `movescu` association sending "
        "one series-level C-MOVE per series, and one `getscu +B` per series (DCMTK 3.6.7's getscu crashes after several queries in one "
        "association); seconds are wall time of the SCU side, CPU and RSS cover both processes; \"Nagle on\" means no `TCP_NODELAY` "
        "in DCMTK's environment (its default). `dicom-assets sync wado-rs` is the same sync with `pacs.protocol: dicomweb` and "
        "`dicomweb.url` at the same Orthanc's DICOMweb plugin (QIDO-RS discovery, one WADO-RS GET per series, no storage SCP); "
        "\"requests\" is `pacs.max_concurrent_associations`, its number of concurrent WADO-RS requests.",
        "",
        *_profile_section(results.get("retrieval_profile") or {"status": "not run", "reason": "not in this run"}),
        "",
        "## 1b. Retrieval over a WAN",
        "",
        *wan_section(results.get("wan") or {"status": "not run", "reason": "not in this run"}),
        "",
        "## 2. Archiving",
        "",
        *_archiving_section(results.get("archiving") or {}),
        "",
        "`dicom-assets patient_archive` is `build_patient_archive` (parallel deflate, fsync, read-back of every member's CRC, "
        "state DB record), timed whole; `zip` only writes.",
        "",
        "## 2b. One multi-GB instance",
        "",
        *_large_instance_section(results.get("large_instance") or {"status": "not run"}, results.get("archiving") or {}),
        "",
        "## 3. Discovery",
        "",
        *_section_figures(results.get("discovery") or {}),
        "",
        "## 3b. Request file",
        "",
        *_request_file_section(results.get("request_file") or {}),
        "",
        "## 4. Scale",
        "",
        *_section_figures(results.get("scale") or {}),
        "",
        "## 5. De-identification",
        "",
        *deidentify_section(results.get("deidentify") or {"status": "not run", "reason": "not in this run"}),
        "",
    ]
    failures = results.get("failures") or []
    if failures:
        lines += ["## Failures", "", *(f"* {f}" for f in failures), ""]
    if results.get("chart"):
        lines += [f"![retrieval and archiving throughput]({results['chart']})", ""]
    return "\n".join(lines)


# -- chart ----------------------------------------------------------------------------------------


def draw_chart(results: dict[str, Any], path: Path) -> str | None:
    """Retrieval MB/s per variant and archiving MB/s per contender; None (and why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    rows = [r for r in results.get("retrieval", []) if r["status"] == "ok"]
    runs = (results.get("archiving") or {}).get("runs", [])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 2.2 + 0.38 * (len(rows) + len(runs))),
                                      gridspec_kw={"height_ratios": [max(len(rows), 1), max(len(runs), 1)]})  # fmt: skip
    colors = {"dicom-assets": "#1f77b4", "dcmtk": "#999999"}
    top.barh([r["label"] for r in rows], [r["mb_per_s"] for r in rows], color=[colors.get(r["tool"], "#999999") for r in rows])
    for i, r in enumerate(rows):
        top.text(r["mb_per_s"], i, f" {r['mb_per_s']:.0f}", va="center", fontsize=8)
    top.invert_yaxis()
    top.set_xlabel("retrieval MB/s (higher is better)")
    top.set_title(f"Retrieval from Orthanc on loopback — {results.get('date', '')}", fontsize=10)
    bottom.barh([r["label"] for r in runs], [r["mb_per_s"] for r in runs], color=["#1f77b4" if "dicom-assets" in r["label"] else "#999999" for r in runs])
    for i, r in enumerate(runs):
        bottom.text(r["mb_per_s"], i, f" {r['mb_per_s']:.0f} (ratio {r['ratio']:.3f})", va="center", fontsize=8)
    bottom.invert_yaxis()
    bottom.set_xlabel("archiving MB/s of input (higher is better)")
    for ax in (top, bottom):
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(x=0.18)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(results: dict[str, Any], out_md: Path) -> tuple[Path, Path, Path | None]:
    """Write results.md, results.json and (with matplotlib) results.png next to each other."""
    out_md.parent.mkdir(parents=True, exist_ok=True)
    png = out_md.with_suffix(".png")
    why_not = draw_chart(results, png)
    results["chart"] = None if why_not else png.name
    if why_not:
        results.setdefault("notes", []).append(f"chart not drawn: {why_not}")
    json_path = out_md.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    out_md.write_text(render_markdown(results))
    return out_md, json_path, None if why_not else png


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results.json")
    write_report(json.loads(source.read_text()), source.with_suffix(".md"))
