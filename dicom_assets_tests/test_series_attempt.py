"""One attempt at a series by C-GET against Orthanc: every instance arrives as the PACS stores it.

Offered one presentation context per SOP class listing every syntax, Orthanc (Debian's 1.10)
accepts Explicit VR Little Endian and transcodes every compressed instance to it. The retriever
proposes one context per (class, syntax) for the classes the IMAGE-level answer names, so JPEG
lossless, RLE, JPEG-LS and lossy JPEG-LS near-lossless arrive in their own syntaxes, byte for
byte; a series of four SOP classes (more than one association's 128 contexts) is fetched by two
C-GETs. Each instance's syntax as received is in the state DB. Compressed test data comes from
DCMTK (dcmcjpeg, dcmcrle, dcmcjpls; Debian's dcmtk, installed by scripts/ensure-services.sh).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest

from dicom_assets.devpacs import CohortSpec, generate_cohort
from dicom_assets.discovery import discover_patients, discover_series, discover_studies
from dicom_assets.layout import series_dir
from dicom_assets.pacs.client import PacsClient
from dicom_assets.pacs.receiver import InstanceSink
from dicom_assets.retrieval import retrieve_patients
from dicom_assets.series_attempt import SeriesRetriever
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port, require_service
from dicom_assets_tests.orthanc import ORTHANC_AET, RECEIVER_AET, running_orthanc
from dicom_assets_tests.pacs_fixtures import make_settings

#: Series index -> (DCMTK encoder and options, the syntax it writes).
ENCODINGS = {
    0: (["dcmcjpeg"], "1.2.840.10008.1.2.4.70"),  # JPEG lossless, first-order prediction
    1: (["dcmcrle"], "1.2.840.10008.1.2.5"),  # RLE lossless
    2: (["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    3: (["dcmcjpls", "+en", "+un"], "1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless (lossy), same UIDs
}
#: The four SOP classes of the last series: too many for one association of per-syntax contexts.
FOUR_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7",
                "1.2.840.10008.5.1.4.1.1.1.1")  # CT, MR, secondary capture, digital X-ray  # fmt: skip


def _encode(path: Path, tool: list[str]) -> None:
    out = path.with_suffix(".enc")
    subprocess.run([*tool, str(path), str(out)], check=True, capture_output=True, timeout=60)
    out.replace(path)


@pytest.fixture
def site(tmp_path: Path, pg_url: str) -> Iterator[tuple[Any, Any, StateStore, Any]]:
    """Orthanc holding 4 series in 4 compressed syntaxes and a 5th of four SOP classes, discovered."""
    require_service(all(shutil.which(t) for t in ("dcmcjpeg", "dcmcrle", "dcmcjpls")), "DCMTK (Debian package dcmtk)")
    spec = CohortSpec(patients=1, studies_per_patient=1, series_per_study=5, slices_per_series=4, rows=64, columns=64,
                      patient_id_prefix="CGET", seed=7)  # fmt: skip
    cohort = generate_cohort(tmp_path / "pacs", spec)
    for n, s in enumerate(cohort.series):
        for path in sorted((tmp_path / "pacs").rglob(f"{s.series_instance_uid}/*.dcm")):
            if n == 3:  # near-lossless JPEG-LS takes unsigned pixels only
                ds = pydicom.dcmread(path)
                ds.PixelRepresentation = 0
                ds.save_as(path)
            if n in ENCODINGS:
                _encode(path, ENCODINGS[n][0])
            else:  # give the instances of the last series four different SOP classes
                ds = pydicom.dcmread(path)
                sop_class = FOUR_CLASSES[s.sop_instance_uids.index(ds.SOPInstanceUID) % 4]
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
                ds.save_as(path)
    with running_orthanc(tmp_path, free_port(), wait_on_stop=False) as orthanc:
        assert orthanc.load(tmp_path / "pacs") == cohort.instances
        settings = make_settings(tmp_path, orthanc.dicom_port, free_port(), pg_url, called_ae_title=ORTHANC_AET,
                                 calling_ae_title=RECEIVER_AET, retrieve_method="c-get")  # fmt: skip
        store = StateStore(pg_url)
        store.create_schema()
        client = PacsClient(settings.pacs)
        discover_patients(client, store, lambda ds: True)
        discover_studies(client, store, list(cohort.patients))
        discover_series(client, store, list(cohort.patients))
        yield cohort, settings, store, client
        store.dispose()


def _source(root: Path, s: Any, uid: str) -> Path:
    return next((root / "pacs").rglob(f"{s.series_instance_uid}/{uid}.dcm"))


def test_cget_brings_every_instance_in_its_stored_syntax(site, tmp_path: Path) -> None:
    cohort, settings, store, client = site
    stats = retrieve_patients(settings, client, store, list(cohort.patients))
    assert [o.status for o in stats.outcomes] == ["complete"] * len(cohort.series)
    table = []
    for n, s in enumerate(cohort.series):
        rows = {r["sop_instance_uid"]: r for r in store.instances_of(s.series_instance_uid)}
        assert sorted(rows) == sorted(s.sop_instance_uids)
        for uid in s.sop_instance_uids:
            got = pydicom.dcmread(series_dir(settings.paths.download_dir, s.patient_id, s.study_instance_uid,
                                             s.series_instance_uid) / f"{uid}.dcm")  # fmt: skip
            source = pydicom.dcmread(_source(tmp_path, s, uid))
            syntax = str(source.file_meta.TransferSyntaxUID)
            assert str(got.file_meta.TransferSyntaxUID) == syntax, f"series {n}: transcoded by the PACS"
            assert got.PixelData == source.PixelData and got.SOPClassUID == source.SOPClassUID
            assert rows[uid]["transfer_syntax_uid"] == syntax and rows[uid]["sop_class_uid"] == str(source.SOPClassUID)
            assert rows[uid]["stored_transfer_syntax_uid"] is None  # Orthanc 1.10 does not say
        table.append((n, ENCODINGS.get(n, (None, "4 SOP classes"))[1], store.get_series(s.series_instance_uid).transfer_syntaxes))
    print("\n" + "\n".join(f"series {n}: stored {want}, received {got}" for n, want, got in table))
    assert store.get_series(cohort.series[3].series_instance_uid).transcoded_instances == 0


def test_the_old_proposal_is_what_made_orthanc_transcode(site, tmp_path: Path) -> None:
    """One context per class listing every syntax (the fallback when the classes are unknown):
    Orthanc accepts Explicit VR Little Endian for the class, then must transcode each instance
    to it or fail (0xC000, "No presentation context" in its log); per-syntax contexts: as stored."""
    cohort, settings, store, client = site
    s = cohort.series[1]  # RLE lossless
    outcomes = {}
    for proposal in (None, ["1.2.840.10008.5.1.4.1.1.2"]):
        sink = InstanceSink(tmp_path / f"get-{proposal is None}")
        with client.session(sink=sink) as session:
            session.propose_for(proposal)
            flight = sink.expect(s.patient_id, s.study_instance_uid, s.series_instance_uid)
            final = session.get(s.study_instance_uid, s.series_instance_uid)
            sink.done(flight)
        outcomes[proposal is None] = (final, {syntax for _c, syntax, _n in flight.arrived.values()})
    old, new = outcomes[True], outcomes[False]
    assert old[1] <= {"1.2.840.10008.1.2.1"} and (old[1] or old[0].status == 0xC000), old  # transcoded, or failed
    assert new[0].succeeded and new[1] == {ENCODINGS[1][1]}, new


def test_a_transcoding_pacs_that_names_the_stored_syntax_is_caught(tmp_path: Path, pg_url: str) -> None:
    """The bundled PACS says how it stores each instance (Available Transfer Syntax UID) and can
    play Orthanc's transcoding: with the old proposal it decompresses RLE, and the comparison of
    what arrived with what it stores names every such instance; the retriever, proposing per
    syntax, gets them as stored and records both syntaxes per instance."""
    from dicom_assets.devpacs import DevPacs
    from dicom_assets.pacs.syntaxes import transcodings

    require_service(bool(shutil.which("dcmcrle")), "DCMTK (Debian package dcmtk)")
    spec = CohortSpec(patients=1, studies_per_patient=1, series_per_study=1, slices_per_series=3, rows=32, columns=32,
                      patient_id_prefix="RLE", seed=8)  # fmt: skip
    cohort = generate_cohort(tmp_path / "pacs", spec)
    for path in (tmp_path / "pacs").rglob("*.dcm"):
        _encode(path, ["dcmcrle"])
    rle, s = "1.2.840.10008.1.2.5", cohort.series[0]
    with DevPacs(tmp_path / "pacs", transcode_to_explicit=True) as pacs:
        settings = make_settings(tmp_path, pacs.port, free_port(), pg_url, retrieve_method="c-get")
        client = PacsClient(settings.pacs)
        sink = InstanceSink(tmp_path / "old-proposal")
        with client.session(sink=sink) as session:
            stored = {i.sop_instance_uid: i.stored_transfer_syntax for i in session.find_instances(s.study_instance_uid, s.series_instance_uid)}
            flight = sink.expect(s.patient_id, s.study_instance_uid, s.series_instance_uid)
            assert session.get(s.study_instance_uid, s.series_instance_uid).succeeded  # the fallback proposal
            sink.done(flight)
        assert set(stored.values()) == {rle}
        found = transcodings({uid: syntax for uid, (_c, syntax, _n) in flight.arrived.items()}, stored)
        assert found.transcoded == tuple(sorted(s.sop_instance_uids)) and found.lossy == ()
        store = StateStore(pg_url)
        store.create_schema()
        discover_patients(client, store, lambda ds: True)
        discover_studies(client, store, list(cohort.patients))
        discover_series(client, store, list(cohort.patients))
        stats = retrieve_patients(settings, client, store, list(cohort.patients))
        rows = store.instances_of(s.series_instance_uid)
        # The whole series, its count and classes known (SOPClassesInStudy): no IMAGE-level
        # C-FIND, so what the PACS stores is not recorded; it arrived as stored all the same.
        assert [o.status for o in stats.outcomes] == ["complete"]
        assert {(r["transfer_syntax_uid"], r["stored_transfer_syntax_uid"]) for r in rows} == {(rle, None)}
        # A partial series is listed: the missing instance arrives as stored and both are known.
        directory = series_dir(settings.paths.download_dir, s.patient_id, s.study_instance_uid, s.series_instance_uid)
        missing = sorted(s.sop_instance_uids)[0]
        (directory / f"{missing}.dcm").unlink()
        receiver_sink = InstanceSink(settings.paths.download_dir)
        with client.session(sink=receiver_sink) as session:
            retriever = SeriesRetriever(settings, client, receiver_sink, session, store.known_sop_classes)
            outcome, expected = retriever.retrieve(store.get_series(s.series_instance_uid))  # type: ignore[arg-type]
    store.dispose()
    assert (outcome.status, expected, outcome.new_instances) == ("complete", 3, 1)
    assert {uid: syntax for uid, (_c, syntax, _n) in outcome.arrived.items()} == {missing: rle}
    assert outcome.stored_syntaxes == {uid: rle for uid in s.sop_instance_uids}


def test_a_cget_whose_known_classes_miss_one_lists_the_series_on_the_retry(tmp_path: Path, pg_url: str) -> None:
    """C-GET of a whole series proposes the classes the state DB knows (SOPClassesInStudy)
    without an IMAGE-level C-FIND. When that list is wrong (here: MR for a CT series), the PACS
    cannot send, the attempt ends incomplete and the retry lists the instances: complete in the
    same run, one attempt counted."""
    import sqlalchemy as sa

    from dicom_assets.devpacs import DevPacs
    from dicom_assets.store import tables as t

    spec = CohortSpec(patients=1, studies_per_patient=1, series_per_study=1, slices_per_series=3, rows=32, columns=32,
                      patient_id_prefix="STALE", seed=9)  # fmt: skip
    cohort = generate_cohort(tmp_path / "pacs", spec)
    s = cohort.series[0]
    with DevPacs(tmp_path / "pacs") as pacs:
        settings = make_settings(tmp_path, pacs.port, free_port(), pg_url, retrieve_method="c-get", retry_initial_s=0.2)
        client = PacsClient(settings.pacs)
        store = StateStore(pg_url)
        store.create_schema()
        discover_patients(client, store, lambda ds: True)
        discover_studies(client, store, list(cohort.patients))
        discover_series(client, store, list(cohort.patients))
        assert store.known_sop_classes(s.series_instance_uid) == ("1.2.840.10008.5.1.4.1.1.2",)  # CT, from the study
        with store.engine.begin() as conn:
            conn.execute(sa.update(t.studies).values(sop_classes_in_study="1.2.840.10008.5.1.4.1.1.4"))  # MR: wrong
        stats = retrieve_patients(settings, client, store, list(cohort.patients))
        state = store.get_series(s.series_instance_uid)
    store.dispose()
    assert [o.status for o in stats.outcomes] == ["complete"]
    assert state is not None and (state.download_status, state.downloaded_instances, state.attempts) == ("complete", 3, 1)
    directory = series_dir(settings.paths.download_dir, s.patient_id, s.study_instance_uid, s.series_instance_uid)
    assert sorted(p.stem for p in directory.glob("*.dcm")) == sorted(s.sop_instance_uids)
