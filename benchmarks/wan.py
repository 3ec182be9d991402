"""Retrieval over a WAN (issue 15): the same retrievals as section 1, with 10 ms added one way on
every path between the PACS and us, by the project's own delay proxy (loopback only).

    python -m benchmarks.wan OUT.json [--work-dir DIR] [--pg-admin-url URL] [--quick]
                                      [--patients N] [--delay-ms 10] [--only KEY[,KEY...]]

Both paths of a C-MOVE go through a delay (``dicom_assets_tests/delay_proxy.py``): our
associations to the PACS (a proxy in front of Orthanc's DICOM port), and the PACS's C-STORE
associations back to the receiver: Orthanc's C-MOVE destinations (its ``DicomModalities``
entries for our AE and DCMTK's) point at ports where a proxy listens, in front of the port our
receiver (or ``storescp``) really binds. WADO-RS goes through a proxy in front of Orthanc's HTTP
port. Every variant gets fresh proxies, a fresh state DB and an empty directory.

Rows: DCMTK ``movescu`` + ``storescp`` (one association, one series-level C-MOVE after the
other; ``TCP_NODELAY=1``), ``dicom-assets sync`` (C-MOVE) with its defaults and with
``max_concurrent_associations`` fixed at 1/2/4/8 (``adaptive_concurrency: off`` once that key
exists), adaptive concurrency with a ceiling of 8 (skipped with a note "adaptive: not built yet"
while ``pacs.<ADAPTIVE_KEY>`` is not a config key, and as "the same settings" while adaptive with
that ceiling is what the defaults row runs anyway), and WADO-RS (defaults and 4 requests). Orthanc
serves up to 16 associations at once here (``ORTHANC_DICOM_THREADS``; its default, 4, caps C-MOVEs). Per row: MB/s, × DCMTK,
the PACS requests granted by the sync's request budget (``pacs_request_log``, sampled while it
runs, since it keeps one window only) as the peak count in any 60 s window and as the rate during
retrieval, the peak of simultaneous connections the proxies saw on the PACS path (our
associations / HTTP connections) and on the receiver path (the PACS's C-STORE associations)
during retrieval, and the faults: A7xx/C0xx statuses in the sync's log, connection resets (seen
by the proxies, recorded by the budget, or counted as a series' network fault).

Cohort: the retrieval section's (``benchmarks/cohorts.py``: 8 patients x 2 series x 130 slices,
1.09 GB); ``--patients N`` (or ``$BENCH_WAN_PATIENTS``) takes the same series shape for N
patients (a cohort of its own, cached); ``--quick`` the 3 MB smoke cohort.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from benchmarks import dcmtk  # noqa: E402
from benchmarks.cohorts import Cohort, cached_cohort, retrieval_spec  # noqa: E402
from benchmarks.orthanc_site import Site, load_directory, start_site  # noqa: E402
from benchmarks.project import ProjectVariant, instance_files, run_project_variant  # noqa: E402
from benchmarks.results import RetrievalRow, dcmtk_row, project_row  # noqa: E402
from dicom_assets.config import PacsSettings  # noqa: E402
from dicom_assets.devpacs.cohort import GeneratedSeries  # noqa: E402
from dicom_assets_tests.delay_proxy import DelayProxy, measure_round_trips, measure_throughput, peak_overlap  # noqa: E402
from dicom_assets_tests.orthanc import distinct_free_ports  # noqa: E402

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DELAY_S = 0.010
#: Fixed association counts tried (``pacs.max_concurrent_associations``), adaptive off.
FIXED_COUNTS = (1, 2, 4, 8)
#: Patients (of 2 series each) retrieved by the round-trip-bound rows, by association count:
#: DCMTK's one series at a time and the project's fixed 1 and 2 take the first 2 patients.
ROUND_TRIP_BOUND_PATIENTS = {1: 2, 2: 2}
#: WADO-RS request counts tried besides the default.
WADO_COUNTS = (4,)
#: The ``pacs:`` key that will switch the adaptive concurrency controller on (issue 15). Until
#: PacsSettings has it, the adaptive row is skipped with a note; once it lands (under this name,
#: or rename it here), the row runs with it on and the fixed rows run with it off.
ADAPTIVE_KEY = "adaptive_concurrency"
ENV_PATIENTS = "BENCH_WAN_PATIENTS"
#: How often the request log is read while a sync runs (it keeps only the budget's window, 60 s).
POLL_S = 0.5
RATE_WINDOW_S = 60.0
#: Orthanc's DicomThreadsCount here: its default, 4, serves at most 4 associations at once, so with
#: 8 associations asking, 4 C-MOVEs wait for a thread (seen in a smoke run: 8 connections on the PACS
#: path, 4 C-STORE associations back). Above the largest count tried, the PACS is not the limit.
ORTHANC_DICOM_THREADS = 2 * max(FIXED_COUNTS)
#: The child process's limit in ``make bench`` (the full section takes ~6-7 min here).
TIMEOUT_S = 1800.0

_STATUS = re.compile(r"0x(A7[0-9A-F]{2}|C[0-9A-F]{3})\b", re.IGNORECASE)
_DCMTK_FAULT = re.compile(r"Refused|Failed|Abort", re.IGNORECASE)


# -- the variants ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanVariant:
    """One row. ``project`` is None for DCMTK; ``requires`` names a ``pacs:`` key the row needs."""

    key: str
    label: str
    tool: str  # "dcmtk" | "dicom-assets"
    method: str  # "c-move" | "wado-rs"
    group: str  # "dcmtk" | "default" | "fixed" | "adaptive" | "wado-rs"
    associations: str
    project: ProjectVariant | None = None
    requires: str | None = None
    same_as: str | None = None  # the key of an earlier row with the very same settings: not run twice
    #: Retrieve only the cohort's first ``patients`` patients (None: all). For the rows whose MB/s
    #: is bound by the round trip of each association (one series at a time, 1 or 2 associations):
    #: their rate does not depend on the cohort's size, and the whole cohort cost 58-62 s each.
    patients: int | None = None
    #: Run twice, the faster kept: the rows the "defaults vs the best fixed count" target compares
    #: (whole cohort, 7-15 s each), whose single runs moved by 10 % from one bench to the next
    #: (defaults 0.85-1.05x of fixed 8 with the same code).
    twice: bool = False


def adaptive_available() -> bool:
    return ADAPTIVE_KEY in PacsSettings.model_fields


def default_associations() -> int:
    return int(PacsSettings.model_fields["max_concurrent_associations"].default)


def adaptive_by_default() -> bool:
    return adaptive_available() and bool(PacsSettings.model_fields[ADAPTIVE_KEY].default)


def wan_variants(quick: bool = False) -> list[WanVariant]:
    """The section's rows, in the order they run. ``quick``: DCMTK, the defaults and the adaptive
    row (a note while it equals the defaults) only."""
    n = default_associations()
    off = ((ADAPTIVE_KEY, False),) if adaptive_available() else ()
    defaults = f"adaptive ≤ {n}" if adaptive_by_default() else str(n)
    fixed = f", {ADAPTIVE_KEY}: off" if off else ""
    rows = [
        WanVariant("dcmtk-move", "DCMTK movescu + storescp +B, one series at a time, TCP_NODELAY=1", "dcmtk", "c-move", "dcmtk", "1",
                   patients=ROUND_TRIP_BOUND_PATIENTS[1]),
        WanVariant("project-default", f"dicom-assets sync c-move, defaults ({defaults} assoc)", "dicom-assets", "c-move", "default",
                   defaults, ProjectVariant("c-move", n, True), twice=True),
    ]  # fmt: skip
    rows += [
        WanVariant(f"project-fixed-{k}", f"dicom-assets sync c-move, max_concurrent_associations: {k}{fixed}", "dicom-assets",
                   "c-move", "fixed", str(k), ProjectVariant("c-move", k, False, off), patients=ROUND_TRIP_BOUND_PATIENTS.get(k),
                   twice=k not in ROUND_TRIP_BOUND_PATIENTS)
        for k in FIXED_COUNTS
    ]  # fmt: skip
    # Adaptive concurrency (issue 15, designed separately): skipped with a note while
    # pacs.<ADAPTIVE_KEY> is not a config key; max_concurrent_associations is its ceiling.
    # Once it is the default with this very ceiling, the defaults row measures it already.
    ceiling = max(FIXED_COUNTS)
    rows.append(WanVariant("project-adaptive", f"dicom-assets sync c-move, {ADAPTIVE_KEY}: on, max_concurrent_associations: {ceiling}",
                           "dicom-assets", "c-move", "adaptive", f"adaptive ≤ {ceiling}",
                           ProjectVariant("c-move", ceiling, False, ((ADAPTIVE_KEY, True),)), requires=ADAPTIVE_KEY,
                           same_as="project-default" if adaptive_by_default() and n == ceiling else None))  # fmt: skip
    rows.append(WanVariant("wado-rs-default", f"dicom-assets sync wado-rs, defaults ({n} requests)", "dicom-assets", "wado-rs",
                           "wado-rs", str(n), ProjectVariant("wado-rs", n, True)))  # fmt: skip
    rows += [
        WanVariant(f"wado-rs-{k}", f"dicom-assets sync wado-rs, {k} requests{fixed}", "dicom-assets", "wado-rs", "wado-rs", str(k),
                   ProjectVariant("wado-rs", k, False, off))
        for k in WADO_COUNTS if k != n
    ]  # fmt: skip
    if quick:  # the harness end to end over the proxies; the full run has the WADO-RS rows
        rows = [r for r in rows if r.key in ("dcmtk-move", "project-default", "project-adaptive")]
    return rows


# -- the link: Orthanc seen through delay proxies -------------------------------------------------


@dataclass(frozen=True)
class WanSite(Site):
    """The benchmark's Orthanc as the clients see it over the WAN: its DICOM and HTTP ports are
    proxies', and the receivers bind ports of their own behind the proxies that listen on the
    ports Orthanc sends C-MOVEs to (``project_receiver_port``/``dcmtk_receiver_port`` here are
    the receivers' real ports, which is what ``write_config`` and ``storescp`` bind)."""

    pacs_proxy_port: int = 0
    http_proxy_port: int = 0

    @property
    def dicom_port(self) -> int:
        return self.pacs_proxy_port

    @property
    def dicomweb_url(self) -> str:
        direct = f"127.0.0.1:{self.orthanc.http_port}"
        url = Site.dicomweb_url.fget(self)  # type: ignore[attr-defined]  # raises without the plugin
        assert direct in url, url
        return url.replace(direct, f"127.0.0.1:{self.http_proxy_port}", 1)


@dataclass
class WanLink:
    site: WanSite
    proxies: dict[str, DelayProxy]

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: p.stats() for name, p in self.proxies.items()}

    def peak(self, names: Sequence[str], start: float, end: float) -> int:
        """Most connections open at once on these proxies between two ``time.time()`` instants."""
        return peak_overlap([iv for n in names for iv in self.proxies[n].intervals()], start, end)

    def resets(self) -> int:
        return sum(p.stats()["resets"] for p in self.proxies.values())


@contextmanager
def wan_link(site: Site, delay_s: float) -> Iterator[WanLink]:
    """Fresh proxies on every path between ``site`` and the clients, for one variant."""
    project_port, dcmtk_port = distinct_free_ports(2)
    proxies = {
        "pacs": DelayProxy(("127.0.0.1", site.dicom_port), delay_s, name="wan-pacs"),
        "http": DelayProxy(("127.0.0.1", site.orthanc.http_port), delay_s, name="wan-http"),
        "receiver": DelayProxy(("127.0.0.1", project_port), delay_s, port=site.project_receiver_port, name="wan-receiver"),
        "storescp": DelayProxy(("127.0.0.1", dcmtk_port), delay_s, port=site.dcmtk_receiver_port, name="wan-storescp"),
    }
    started: list[DelayProxy] = []
    try:
        for proxy in proxies.values():
            started.append(proxy.start())
        wan = WanSite(site.orthanc, project_port, dcmtk_port, pacs_proxy_port=proxies["pacs"].port,
                      http_proxy_port=proxies["http"].port)  # fmt: skip
        yield WanLink(wan, proxies)
    finally:
        for proxy in started:
            proxy.stop()


# -- what the sync asked of the PACS --------------------------------------------------------------


class RequestLog:
    """The PACS requests a sync's budget granted (``pacs_request_log``), read every ``POLL_S``
    while it runs and accumulated (the table keeps only the budget's window), plus, at the end,
    the budget's counters and the series' retry counts, before the state DB is dropped."""

    def __init__(self, database_url: str) -> None:
        self.engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
        self.requests: dict[int, tuple[float, str]] = {}
        self.budget: dict[str, Any] = {}
        self.series: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wan-request-log", daemon=True)

    def __enter__(self) -> RequestLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._poll()
        try:
            with self.engine.connect() as conn:
                b = conn.execute(sa.text(
                    "SELECT coalesce(sum(granted), 0), coalesce(sum(deferred), 0), coalesce(sum(resets), 0), min(lowest_limit) FROM pacs_budgets"
                )).one()  # fmt: skip
                s = conn.execute(sa.text(
                    "SELECT count(*), coalesce(sum(attempts), 0), coalesce(sum(network_faults), 0) FROM series"
                )).one()  # fmt: skip
            self.budget = {"granted": int(b[0]), "deferred": int(b[1]), "resets": int(b[2]), "lowest_limit": b[3]}
            self.series = {"series": int(s[0]), "attempts_counted": int(s[1]), "network_faults": int(s[2])}
        except sa.exc.SQLAlchemyError as error:
            self.budget = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        finally:
            self.engine.dispose()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()

    def _poll(self) -> None:
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT request_id, sent_at, what FROM pacs_request_log")).all()
        except sa.exc.SQLAlchemyError:
            return  # the sync has not created its tables yet
        for request_id, sent_at, what in rows:
            self.requests.setdefault(int(request_id), (sent_at.timestamp(), what))

    def times(self) -> list[float]:
        return sorted(at for at, _ in self.requests.values())


def peak_per_window(times: Sequence[float], window_s: float = RATE_WINDOW_S) -> int:
    """Most of the sorted ``times`` within any ``window_s`` (half-open) window."""
    best, lo = 0, 0
    for hi, at in enumerate(times):
        while at - times[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _log_faults(paths: Sequence[Path], dcmtk_style: bool = False) -> tuple[int, list[str]]:
    """Lines naming an A7xx/C0xx status (DCMTK: also refusals, failures, aborts) and the first few of them."""
    lines: list[str] = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        lines += [ln.strip() for ln in text.splitlines() if _STATUS.search(ln) or (dcmtk_style and _DCMTK_FAULT.search(ln))]
    return len(lines), lines[:5]


# -- measuring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortPart:
    """What one row retrieves: the whole cohort, or its first patients."""

    series: tuple[GeneratedSeries, ...]
    patient_ids: tuple[str, ...]
    whole: bool

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)

    @property
    def regex(self) -> str:
        """``selection.patient_id_regex`` for exactly these patients."""
        return "^(?:" + "|".join(re.escape(p) for p in self.patient_ids) + ")$"


def cohort_part(cohort: Cohort, patients: int | None) -> CohortPart:
    ids = cohort.patient_ids if patients is None else cohort.patient_ids[:patients]
    return CohortPart(tuple(s for s in cohort.series if s.patient_id in ids), tuple(ids), len(ids) == len(cohort.patient_ids))


def _measure_dcmtk(variant: WanVariant, site: Site, part: CohortPart, directory: Path, delay_s: float) -> dict[str, Any]:
    with wan_link(site, delay_s) as link:
        try:
            result = dcmtk.move_with_storescp(link.site, part.series, directory / "received", directory / "logs", True)
        finally:
            shutil.rmtree(directory / "received", ignore_errors=True)
        move = result.usages[0]
        start, end = move.started_at, move.started_at + move.wall_s
        wan = {
            "peak_assoc_pacs": link.peak(["pacs"], start, end),
            "peak_assoc_receiver": link.peak(["storescp"], start, end),
            "proxy_resets": link.resets(),
            "proxies": link.stats(),
        }
    row = dcmtk_row(variant.key, variant.label, "c-move", variant.associations, part.instances, result)
    statuses, examples = _log_faults([u.log_file for u in result.usages], dcmtk_style=True)
    requests = 1 + len(part.series)  # its client's count: one association, one C-MOVE per series
    wan.update(
        requests=requests, requests_counted_by="client (1 association + 1 C-MOVE per series)",
        # evenly spread (one C-MOVE after the other): all of them within one window, or the rate
        requests_per_min_peak=requests if move.wall_s <= RATE_WINDOW_S else round(requests * RATE_WINDOW_S / move.wall_s),
        requests_per_min_retrieval=round(requests * 60 / move.wall_s, 1) if move.wall_s > 0 else None,
        status_faults=statuses, status_examples=examples, budget_resets=0, network_faults=0,
    )  # fmt: skip
    return {**row.as_dict(), **wan}


def _measure_project(variant: WanVariant, site: Site, part: CohortPart, directory: Path, pg: str, delay_s: float) -> dict[str, Any]:
    assert variant.project is not None
    logs: list[RequestLog] = []

    @contextmanager
    def watch(database_url: str) -> Iterator[RequestLog]:
        with RequestLog(database_url) as log:
            logs.append(log)
            yield log

    pacs_path = ["http"] if variant.method == "wado-rs" else ["pacs"]
    with wan_link(site, delay_s) as link:
        try:
            result = run_project_variant(link.site, variant.project, directory, pg, part.regex, watch=watch)
            _, _, newest = instance_files(directory / "downloads")
        finally:
            for bulky in ("downloads", "archives"):
                shutil.rmtree(directory / bulky, ignore_errors=True)
        end = newest if newest is not None else time.time()
        start = end - result.retrieval_s
        wan = {
            "peak_assoc_pacs": link.peak(pacs_path, start, end),
            "peak_assoc_receiver": None if variant.method == "wado-rs" else link.peak(["receiver"], start, end),
            "proxy_resets": link.resets(),
            "proxies": link.stats(),
        }
    row = project_row(variant.key, variant.project, part.instances, result)
    row.label, row.associations = variant.label, variant.associations
    log = logs[0]
    times = log.times()
    during = [t for t in times if start - 0.5 <= t <= end]
    statuses, examples = _log_faults([result.usage.log_file])
    wan.update(
        requests=len(times), requests_counted_by="state DB (pacs_request_log)",
        requests_during_retrieval=len(during),
        requests_per_min_peak=peak_per_window(times),
        requests_per_min_retrieval=round(len(during) * 60 / result.retrieval_s, 1) if result.retrieval_s > 0 else None,
        request_kinds=_kinds(log), budget=log.budget, series_counts=log.series,
        status_faults=statuses, status_examples=examples,
        budget_resets=int(log.budget.get("resets") or 0), network_faults=int(log.series.get("network_faults") or 0),
    )  # fmt: skip
    return {**row.as_dict(), **wan}


def _kinds(log: RequestLog) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for _, what in log.requests.values():
        kind = what.split(" ")[0] if what.startswith(("QIDO", "WADO")) else what
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _failed_row(variant: WanVariant, expected: int, reason: str) -> dict[str, Any]:
    row = RetrievalRow(variant.key, variant.label, variant.tool, variant.method, variant.associations, expected, status="failed", reason=reason)
    return row.as_dict()


def _run_variant(variant: WanVariant, site: Site, cohort: Cohort, base: Path, pg: str, delay_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    directory = base / variant.key
    part = cohort_part(cohort, variant.patients)
    try:
        if variant.project is None:
            row = _measure_dcmtk(variant, site, part, directory, delay_s)
        else:
            row = _measure_project(variant, site, part, directory, pg, delay_s)
    except Exception as exc:  # noqa: BLE001 - one broken variant must not cost the others
        traceback.print_exc()
        row = _failed_row(variant, part.instances, f"{type(exc).__name__}: {exc}"[:4000])
    row.update(group=variant.group, patients=len(part.patient_ids), series=len(part.series), whole_cohort=part.whole)
    if not part.whole:
        row["label"] += f" ({len(part.series)} of the {len(cohort.series)} series)"
    if row["status"] != "ok":
        log(f"FAILED {variant.label}: {row['reason'].splitlines()[0] if row['reason'] else ''}")
    elif not row["complete"]:
        log(f"FAILED {variant.label}: only {row['instances']} of {row['expected_instances']} instances on disk")
    else:
        log(f"{variant.label}: {row['mb_per_s']:.1f} MB/s in {row['seconds']:.1f} s, {row['requests']} requests "
            f"(peak {row['requests_per_min_peak']}/min), peak {row['peak_assoc_pacs']} on the PACS path / "
            f"{row['peak_assoc_receiver'] if row['peak_assoc_receiver'] is not None else '-'} on the receiver path, {row['status_faults']} A7xx/C0xx, "
            f"{row['proxy_resets']} resets at the proxies")  # fmt: skip
    return row


def _faster_row(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The better of two runs of one row (complete first, then MB/s); both runs' MB/s kept."""
    best = max(a, b, key=lambda r: (r["status"] == "ok" and bool(r.get("complete")), r.get("mb_per_s") or 0.0))
    return {**best, "runs_mb_per_s": [r.get("mb_per_s") for r in (a, b)]}


def proxy_check(delay_s: float) -> dict[str, Any]:
    """The proxy on its own: round trips of one byte and a bulk transfer through it (loopback)."""
    try:
        return {"round_trip": measure_round_trips(delay_s), "throughput": measure_throughput(delay_s, megabytes=256)}
    except Exception as exc:  # noqa: BLE001 - a figure about the tool, not a reason to stop
        return {"error": f"{type(exc).__name__}: {exc}"}


def wan_cohort(work_dir: Path, quick: bool, patients: int | None) -> Cohort:
    spec = retrieval_spec(quick)
    if patients:
        spec = dataclasses.replace(spec, patients=patients)
    return cached_cohort(work_dir, spec)


def run_wan_benchmark(
    work_dir: Path, run_dir: Path, pg_admin_url: str, quick: bool = False, patients: int | None = None,
    delay_s: float = DELAY_S, only: Sequence[str] = (), log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The section's figures (the ``figures`` of its JSON): cohort, proxy check, rows, skipped rows."""
    started = time.monotonic()
    cohort = wan_cohort(work_dir, quick, patients)
    log(f"wan: cohort {cohort.describe()} ({'generated now' if cohort.generated_now else 'cached'})")
    check = proxy_check(delay_s)
    log(f"wan: proxy alone: {json.dumps(check)}")
    variants = [v for v in wan_variants(quick) if not only or v.key in only]
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    runnable = []
    for v in variants:
        note = None
        if v.requires and v.requires not in PacsSettings.model_fields:
            note = f"adaptive: not built yet (pacs.{v.requires} is not a config key)"
        elif v.same_as and any(o.key == v.same_as for o in variants):
            note = f"the same settings as the defaults row (pacs.{ADAPTIVE_KEY} on by default, ceiling {default_associations()}): see it"
        if note:
            skipped.append({"key": v.key, "label": v.label, "group": v.group, "note": note})
            log(f"wan: skipped {v.label}: {note}")
        else:
            runnable.append(v)
    site = start_site(run_dir / "orthanc", dicomweb=any(v.method == "wado-rs" for v in runnable), dicom_threads=ORTHANC_DICOM_THREADS)
    try:
        log(f"wan: Orthanc on 127.0.0.1:{site.dicom_port}; loading {cohort.instances} instances")
        load_started = time.monotonic()
        loaded = load_directory(site, cohort.dicom_dir)
        if loaded != cohort.instances or site.orthanc.instance_count() != cohort.instances:
            raise RuntimeError(f"Orthanc holds {site.orthanc.instance_count()} instances, the cohort has {cohort.instances}")
        load_s = time.monotonic() - load_started
        for v in runnable:
            log(f"wan: {v.label} over {delay_s * 2000:g} ms RTT")
            row = _run_variant(v, site, cohort, run_dir / "runs", pg_admin_url, delay_s, log)
            if v.twice and not quick:
                row = _faster_row(row, _run_variant(v, site, cohort, run_dir / "runs-again", pg_admin_url, delay_s, log))
            rows.append(row)
    finally:
        site.orthanc.stop()
        for bulky in ("storage", "index"):
            shutil.rmtree(site.orthanc.root / bulky, ignore_errors=True)
    return {
        "delay_ms": delay_s * 1000,
        "rtt_ms": delay_s * 2000,
        "cohort": cohort.describe(),
        "cohort_mb": round(cohort.bytes / 1e6, 1),
        "series": len(cohort.series),
        "instances": cohort.instances,
        "orthanc_load_s": round(load_s, 2),
        "proxy_check": check,
        "adaptive_available": adaptive_available(),
        "default_associations": default_associations(),
        "budget_per_minute": int(PacsSettings.model_fields["max_requests_per_minute"].default),
        "orthanc_dicom_threads": ORTHANC_DICOM_THREADS,
        "rows": rows,
        "skipped": skipped,
        "seconds": round(time.monotonic() - started, 1),
    }


def failures(section: dict[str, Any]) -> list[str]:
    """What makes the run's exit status 1: the section failed, or a row failed or missed instances."""
    if section.get("status") == "failed":
        return [f"wan: {(section.get('reason') or 'failed').strip().splitlines()[-1][:300]}"]
    out = []
    for r in (section.get("figures") or {}).get("rows", []):
        if r["status"] != "ok":
            out.append(f"wan {r['label']}: {(r['reason'] or 'failed').splitlines()[0]}")
        elif not r["complete"]:
            out.append(f"wan {r['label']}: {r['instances']} of {r['expected_instances']} instances on disk")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the section's JSON ({status, figures, reason, seconds})")
    parser.add_argument("--work-dir", type=Path, default=Path("bench-work"), help="cohort cache (default: bench-work/)")
    parser.add_argument("--run-dir", type=Path, help="scratch: Orthanc, logs (default: <work-dir>/last-run/wan)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("DATABASE_URL") or DEFAULT_PG)
    parser.add_argument("--quick", action="store_true", help="the 3 MB smoke cohort, 3 rows")
    parser.add_argument("--patients", type=int, default=int(os.environ.get(ENV_PATIENTS) or 0) or None,
                        help=f"patients of 2 x 130 slices (default: ${ENV_PATIENTS}, else the retrieval cohort's 8)")  # fmt: skip
    parser.add_argument("--delay-ms", type=float, default=DELAY_S * 1000, help="one way, each direction (default 10)")
    parser.add_argument("--only", default="", help="comma-separated row keys (e.g. dcmtk-move,project-default)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir.resolve()
    run_dir = (args.run_dir or work_dir / "last-run" / "wan").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {message}", flush=True)

    try:
        figures = run_wan_benchmark(work_dir, run_dir, args.pg_admin_url, args.quick, args.patients, args.delay_ms / 1000,
                                    [k for k in args.only.split(",") if k], log)  # fmt: skip
        result: dict[str, Any] = {"status": "ok", "figures": figures, "reason": ""}
    except BaseException:  # noqa: BLE001 - written down as the section's failure, like benchmarks/external.py
        traceback.print_exc()
        result = {"status": "failed", "figures": {}, "reason": traceback.format_exc(limit=8)[-3000:]}
    result["seconds"] = round(time.monotonic() - started, 1)
    result["failures"] = failures(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    from benchmarks.report import targets_markdown, wan_section, wan_targets

    print("\n".join(wan_section(result)) + "\n\n" + targets_markdown(wan_targets(result)), flush=True)
    return 0 if result["status"] == "ok" and not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
