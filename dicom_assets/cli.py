"""The ``dicom-assets`` command: demo, sync, status and the bundled PACS."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from dicom_assets.config import ConfigError


def _move_destination(text: str) -> tuple[str, tuple[str, int]]:
    try:
        ae, _, address = text.partition("=")
        host, _, port = address.rpartition(":")
        if not ae or not host:
            raise ValueError
        return ae, (host, int(port))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AE=HOST:PORT, e.g. DICOM_ASSETS=127.0.0.1:11113") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-assets", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline against the bundled PACS and a synthetic cohort")
    demo.add_argument("--workdir", type=Path, default=Path("demo-work"), help="where everything goes (default: demo-work)")
    demo.add_argument("--patients", type=int, default=4)
    demo.add_argument("--slices", type=int, default=24, help="slices per series")
    demo.add_argument("--size", type=int, default=256, help="rows and columns of each slice")

    dev = sub.add_parser("dev", help="the Dagster UI on 127.0.0.1 over the demo world (what `make dev` runs)")
    dev.add_argument("--workdir", type=Path, default=Path("demo-work"), help="the demo's work dir (default: demo-work)")
    dev.add_argument("--ui-port", type=int, default=3000, help="Dagster UI port on 127.0.0.1 (default 3000)")

    sync = sub.add_parser("sync", help="one complete pass against the configured PACS (runs show in the Dagster UI)")
    sync.add_argument("--config", help="config file (default: $DICOM_ASSETS_CONFIG)")
    sync.add_argument("--no-progress", action="store_true", help="no progress display")
    sync.add_argument(
        "--full-discovery", action="store_true",
        help="ask the PACS for studies of every StudyDate, not only those since the watermark (see discovery: in the config)",
    )  # fmt: skip
    sync.add_argument(
        "--json-summary", type=Path, metavar="PATH",
        help="also write the pass's figures (retrieval seconds/bytes/instances, status counts, runs) as JSON to PATH",
    )  # fmt: skip

    status = sub.add_parser("status", help="series by download status, patients archived / pending, the PACS's request rate")
    status.add_argument("--config", help="config file (default: $DICOM_ASSETS_CONFIG)")

    retry = sub.add_parser(
        "retry", help="make given-up series claimable again (their attempts reset to 0); the next sync fetches them",
    )  # fmt: skip
    retry.add_argument("--config", help="config file (default: $DICOM_ASSETS_CONFIG)")
    retry.add_argument("--failed", action="store_true", help="series given up after pacs.max_attempts (status failed)")
    retry.add_argument("--incomplete", action="store_true", help="also series left incomplete (reset their count)")
    retry.add_argument("--patient", action="append", default=[], metavar="PATIENT_ID", help="only this patient (repeatable)")
    retry.add_argument("--series", action="append", default=[], metavar="SERIES_UID", help="only this series (repeatable)")
    retry.add_argument("--dry-run", action="store_true", help="list what would be reset, change nothing")

    crosswalk = sub.add_parser(
        "crosswalk", help="export PatientID <-> pseudonym and date shift of the de-identified copies (honest broker only)",
    )  # fmt: skip
    crosswalk.add_argument("--config", help="config file (default: $DICOM_ASSETS_CONFIG)")
    crosswalk.add_argument("--out", type=Path, required=True, help="CSV file to create (never overwritten; mode 0600)")

    pacs = sub.add_parser("pacs", help="the bundled development PACS").add_subparsers(dest="pacs_command", required=True)
    serve = pacs.add_parser("serve", help="serve a folder of DICOM files (C-ECHO, C-FIND, C-MOVE, C-GET)")
    serve.add_argument("--dir", type=Path, required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--ae-title", default="DEVPACS")
    serve.add_argument("--move-destination", type=_move_destination, action="append", default=[], metavar="AE=HOST:PORT")
    serve.add_argument(
        "--reset-above-per-minute", type=int, default=0, metavar="N",
        help="fault injection: abort every open association when more than N requests (associations and "
             "C-ECHO/FIND/MOVE/GET) arrive within 60 s, like a PACS that resets overloaded connections (0 = off; "
             "the window follows $DICOM_ASSETS_BUDGET_WINDOW_S when set)",
    )  # fmt: skip
    serve.add_argument(
        "--transcode-to-explicit", action="store_true",
        help="play a PACS that transcodes like Orthanc: what the peer did not accept as stored is decoded and sent as "
             "Explicit VR Little Endian (0xC000 'Cannot transcode' where no decoder exists)",
    )  # fmt: skip
    serve.add_argument(
        "--drop-every", type=float, default=0, metavar="SECONDS",
        help="fault injection: abort every open association every SECONDS, like a nightly network reset (0 = off)",
    )  # fmt: skip
    generate = pacs.add_parser("generate", help="write a synthetic CT cohort into a folder")
    generate.add_argument("--dir", type=Path, required=True)
    generate.add_argument("--patients", type=int, default=3)
    generate.add_argument("--studies", type=int, default=1, help="studies per patient")
    generate.add_argument("--series", type=int, default=2, help="series per study")
    generate.add_argument("--slices", type=int, default=10, help="slices per series")
    generate.add_argument("--size", type=int, default=64, help="rows and columns")
    generate.add_argument("--prefix", default="DEMO", help="PatientID prefix")
    generate.add_argument("--seed", type=int, default=0)
    add = pacs.add_parser("add-series", help="add a synthetic series to a patient of a generated cohort")
    add.add_argument("--dir", type=Path, required=True)
    add.add_argument("--patient-id", required=True)
    add.add_argument("--slices", type=int, default=10)
    add.add_argument("--size", type=int, default=64)
    return parser


def cmd_sync(args: argparse.Namespace) -> int:
    from dicom_assets.sync import run_sync

    if args.json_summary and not os.access(args.json_summary.resolve().parent, os.W_OK):
        print(f"--json-summary {args.json_summary}: its directory does not exist or is not writable", file=sys.stderr)
        return 2  # said before the pass, not after an hour of it
    from dicom_assets import stopping

    report = stopping.run_stoppable(
        lambda: run_sync(args.config, progress=not args.no_progress, full_discovery=args.full_discovery)
    )
    if stopping.PROCESS.requested:
        print(f"dicom-assets: stopped ({stopping.PROCESS.reason}); nothing downloaded is lost, "
              f"run the same command again to resume", file=sys.stderr)
        return stopping.exit_status(stopping.PROCESS.signal_number)
    if args.json_summary:  # machine-readable figures, e.g. for benchmarks/run.py
        import dataclasses
        import json

        args.json_summary.write_text(json.dumps({**dataclasses.asdict(report), "ok": report.ok}, indent=2) + "\n")
    counts = report.status_counts
    print(
        f"series: {counts.get('complete', 0)} complete, {counts.get('incomplete', 0)} incomplete, "
        f"{counts.get('failed', 0)} failed, {counts.get('pending', 0)} pending, {counts.get('skipped', 0)} skipped; "
        f"patients archived {report.patient_counts.get('archived', 0)}/{report.patient_counts.get('patients', 0)}; "
        f"{report.seconds:.1f}s"
    )
    if report.failed_runs:
        print(f"failed runs: {', '.join(report.failed_runs)} (see the Dagster UI for their logs)", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_assets.config import load_settings
    from dicom_assets.store import StateStore

    settings = load_settings(args.config)
    store = StateStore(settings.database.url)
    store.create_schema()
    for status, count in store.status_counts().items():
        print(f"{status:12} {count}")
    patients = store.patient_counts()
    nothing_held = patients.get("patients", 0) - patients.get("archived", 0) - patients.get("pending", 0)
    print(f"patients     {patients.get('patients', 0)} ({patients.get('archived', 0)} archived, {patients.get('pending', 0)} pending"
          + (f", {nothing_held} with every series skipped)" if nothing_held else ")"))
    budget = _budget(settings, store)
    print(f"pacs         {budget.rate().describe()}")
    print(f"retrieves    {_concurrency_line(settings, store.concurrency_state(budget.pacs_key))}")
    rows = store.request_rows()
    if settings.selection.request_file is not None or rows:
        counts = Counter(row.resolution for row in rows)
        print(f"request rows {len(rows)} in the state DB (" + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(counts.items()))
              + f"); the answer per row: materialize request_report ({settings.paths.report_dir / 'request_report.csv'})")
    return 0


def _concurrency_line(settings, state) -> str:  # type: ignore[no-untyped-def]
    """The count of concurrent retrieves: in force, highest reached, cuts, in flight now."""
    p = settings.pacs
    if not p.adaptive_concurrency:
        return f"{p.max_concurrent_associations} at once (pacs.adaptive_concurrency: false)"
    if state.limit is None:
        return f"adaptive up to {p.max_concurrent_associations}, not probed yet (starts at {p.start_concurrent_associations})"
    return (f"{state.limit} at once of up to {p.max_concurrent_associations} (adaptive; highest {state.peak}, "
            f"{state.cuts} cuts by A7xx/C0xx or resets); {state.in_flight} in flight now")


def _budget(settings, store):  # type: ignore[no-untyped-def]
    from dicom_assets.pacs.budget import DatabaseBudget, pacs_key

    p = settings.pacs
    key = settings.dicomweb.budget_key() if p.protocol == "dicomweb" and settings.dicomweb else pacs_key(p.host, p.port, p.called_ae_title)
    return DatabaseBudget(store, key, p.max_requests_per_minute, adaptive=p.adaptive_rate, floor=p.rate_floor)


def cmd_crosswalk(args: argparse.Namespace) -> int:
    """Write the crosswalk CSV: the only way it leaves the state DB. A new file readable by its
    owner only; an existing file is never overwritten (it may be another study's crosswalk)."""
    import csv

    from dicom_assets.config import load_settings
    from dicom_assets.store import StateStore

    settings = load_settings(args.config)
    store = StateStore(settings.database.url)
    store.create_schema()
    rows = store.crosswalk()
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"dicom-assets crosswalk: {args.out} exists; choose a new file name (it is never overwritten)", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "pseudonym", "date_shift_days", "created_at"])
        for row in rows:
            writer.writerow([row.patient_id, row.pseudonym, row.date_shift_days, row.created_at.isoformat() if row.created_at else ""])
    print(f"{len(rows)} patients written to {args.out} (mode 0600): keep it with the honest broker")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """List (and unless --dry-run, reset) the series a sync no longer claims by itself."""
    from dicom_assets.config import load_settings
    from dicom_assets.store import StateStore

    statuses = [s for s, wanted in (("failed", args.failed), ("incomplete", args.incomplete)) if wanted]
    if not statuses:
        print("dicom-assets retry: say which series: --failed and/or --incomplete", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    store = StateStore(settings.database.url)
    store.create_schema()
    found = store.series_to_retry(statuses, args.patient, args.series)
    for s in found:
        print(f"{s.patient_id}\t{s.series_instance_uid}\t{s.download_status}\t{s.downloaded_instances}/"
              f"{s.expected_instances if s.expected_instances is not None else '?'} instances\t"
              f"{s.attempts} attempts\t{s.last_error or ''}")
    if args.dry_run:
        print(f"{len(found)} series would be made claimable again (dry run: nothing changed)")
        return 0
    reset = store.reset_attempts([s.series_instance_uid for s in found])
    print(f"{reset} series claimable again (attempts reset to 0); run `dicom-assets sync` to fetch them")
    return 0


def cmd_pacs(args: argparse.Namespace) -> int:
    from dicom_assets import devpacs

    if args.pacs_command == "serve":
        from dicom_assets.pacs.budget import budget_window_s

        if args.reset_above_per_minute < 0 or args.drop_every < 0:
            print("dicom-assets: --reset-above-per-minute and --drop-every must be >= 0", file=sys.stderr)
            return 2
        devpacs.serve_forever(
            args.dir, args.port, ae_title=args.ae_title, host=args.host, move_destinations=dict(args.move_destination),
            reset_above_per_minute=args.reset_above_per_minute, drop_every_s=args.drop_every,
            transcode_to_explicit=args.transcode_to_explicit,
            window_s=budget_window_s(),
        )  # fmt: skip
        return 0
    if args.pacs_command == "generate":
        spec = devpacs.CohortSpec(
            patients=args.patients,
            studies_per_patient=args.studies,
            series_per_study=args.series,
            slices_per_series=args.slices,
            rows=args.size,
            columns=args.size,
            patient_id_prefix=args.prefix,
            seed=args.seed,
        )
        summary = devpacs.generate_cohort(args.dir, spec)
        print(f"{len(summary.patients)} patients, {len(summary.series)} series, {summary.instances} instances, {summary.bytes} bytes in {args.dir}")
        return 0
    added = devpacs.add_series(args.dir, args.patient_id, slices=args.slices, rows=args.size, columns=args.size)
    print(f"added series {added.series_instance_uid} ({added.instances} instances) to {args.patient_id!r}")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from dicom_assets.dev import run_dev

    return run_dev(args.workdir, ui_port=args.ui_port)


def cmd_demo(args: argparse.Namespace) -> int:
    from dicom_assets.demo import run_demo

    return run_demo(args.workdir, patients=args.patients, slices=args.slices, size=args.size)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("pynetdicom", "alembic", "dicom_assets.devpacs", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {
        "sync": cmd_sync, "status": cmd_status, "retry": cmd_retry, "crosswalk": cmd_crosswalk, "pacs": cmd_pacs,
        "demo": cmd_demo, "dev": cmd_dev,
    }  # fmt: skip
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"dicom-assets: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dicom-assets: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except _state_db_errors() as exc:
        print(f"dicom-assets: the state DB is unreachable ({type(exc).__name__}); nothing already "
              f"downloaded is lost, run the same command again when it is back", file=sys.stderr)
        return 1


def _state_db_errors() -> tuple[type[BaseException], ...]:
    """SQLAlchemy's connection-level errors (imported late: the CLI starts without SQLAlchemy)."""
    import sqlalchemy.exc

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


if __name__ == "__main__":
    sys.exit(main())
