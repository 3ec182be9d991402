"""Config loading: ${VAR} substitution, defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_assets.config import ConfigError, load_selection_rule, load_settings, selection_rule_name, settings_from_dict

MINIMAL = {
    "pacs": {"host": "127.0.0.1", "port": 4242, "called_ae_title": "ORTHANC"},
    "paths": {"download_dir": "dl", "archive_dir": "zips", "report_dir": "reports"},
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    settings = settings_from_dict(MINIMAL, base_dir=tmp_path)
    assert settings.pacs.retrieve_method == "c-move"
    assert settings.pacs.max_requests_per_minute == 700
    assert settings.archive.delimiter == "__seriesCount"
    assert settings.archive.keep_superseded is False
    assert settings.paths.download_dir == tmp_path / "dl"


def test_the_shipped_sample_config_loads_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """config-sample.yaml is what sites copy: its optional sections, every key commented out,
    mean the defaults (they parse as empty); its adaptive rate defaults to a tenth of the maximum."""
    monkeypatch.setenv("DICOM_ASSETS_DB_PASSWORD", "secret")
    settings = load_settings(Path(__file__).resolve().parents[1] / "config-sample.yaml")
    assert settings.publish.directory is None and settings.heartbeats.discovery is None
    assert settings.pacs.adaptive_rate and settings.pacs.rate_floor == 70


def test_env_var_substitution_for_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    path = _write(
        tmp_path,
        """
pacs: {host: 127.0.0.1, port: 4242, called_ae_title: ORTHANC}
paths: {download_dir: dl, archive_dir: zips, report_dir: reports}
database: {url: "postgresql://user:${DB_PASSWORD}@127.0.0.1/db"}
""",
    )
    assert load_settings(path).database.url == "postgresql://user:s3cret@127.0.0.1/db"


def test_missing_env_var_names_key_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    path = _write(
        tmp_path,
        "pacs: {host: '${NOPE_NOT_SET}', port: 1, called_ae_title: X}\npaths: {download_dir: a, archive_dir: b, report_dir: c}\n",
    )
    with pytest.raises(ConfigError, match=r"pacs\.host: environment variable NOPE_NOT_SET is not set"):
        load_settings(path)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"pacs": {**MINIMAL["pacs"], "port": 70000}}, r"pacs\.port: Input should be less than or equal to 65535"),
        ({"pacs": {**MINIMAL["pacs"], "retrieve_method": "c-send"}}, r"pacs\.retrieve_method"),
        ({"pacs": {**MINIMAL["pacs"], "called_ae_title": "X" * 17}}, r"pacs\.called_ae_title: must be 1-16"),
        ({"archive": {"delimiter": "../x"}}, r"archive\.delimiter: must be"),
        ({"selection": {"patient_id_regex": "(["}}, r"selection\.patient_id_regex: is not a valid regular expression"),
        ({"selection": {"patient_id_regex": "A", "function": "m:f"}}, r"selection: set either"),
        ({"database": {"url": "mysql://x"}}, r"database\.url: must start with"),
        ({"pacs": {"host": "h", "port": 1}}, r"pacs\.called_ae_title: is required"),
        ({"pacz": {}}, r"pacz: unknown key"),
    ],
)
def test_invalid_values_name_the_key(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_dict({**MINIMAL, **patch})


def test_unreadable_and_invalid_yaml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_settings(_write(tmp_path, "pacs: [unclosed"))


def test_no_config_at_all_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_ASSETS_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="--config FILE or set DICOM_ASSETS_CONFIG"):
        load_settings(None)


def _patient(pid: str) -> Dataset:
    ds = Dataset()
    ds.PatientID = pid
    return ds


def test_selection_regex_searches_patient_id() -> None:
    rule = load_selection_rule(settings_from_dict({**MINIMAL, "selection": {"patient_id_regex": "^THL"}}).selection)
    assert rule(_patient("THL-001"))
    assert not rule(_patient("XTHL-001"))


def test_selection_function_is_loaded_and_bad_paths_fail_clearly() -> None:
    ok = settings_from_dict({**MINIMAL, "selection": {"function": "os.path:isabs"}}).selection
    assert load_selection_rule(ok)("/x") is True
    bad = settings_from_dict({**MINIMAL, "selection": {"function": "no_such_module_xyz:f"}}).selection
    with pytest.raises(ConfigError, match="selection.function: cannot load"):
        load_selection_rule(bad)


def test_default_selection_keeps_everyone() -> None:
    assert load_selection_rule(settings_from_dict(MINIMAL).selection)(_patient("anything"))


def test_new_pacs_and_receiver_keys_have_defaults_and_are_validated() -> None:
    settings = settings_from_dict(MINIMAL)
    assert settings.pacs.max_attempts == 5 and settings.pacs.wait_for_pacs_s == 600
    assert settings.pacs.blackout == [] and settings.pacs.max_find_results == 0
    assert settings.receiver.allowed_ae_titles is None and settings.receiver.allowed_hosts is None
    with pytest.raises(ConfigError, match=r"pacs\.blackout: .*HH:MM-HH:MM"):
        settings_from_dict({**MINIMAL, "pacs": {**MINIMAL["pacs"], "blackout": ["25:00-03:00"]}})
    with pytest.raises(ConfigError, match=r"receiver\.allowed_hosts: 'pacs\.example' is not an IP address"):
        settings_from_dict({**MINIMAL, "receiver": {"allowed_hosts": ["pacs.example"]}})
    with pytest.raises(ConfigError, match=r"pacs\.max_attempts"):
        settings_from_dict({**MINIMAL, "pacs": {**MINIMAL["pacs"], "max_attempts": 0}})


def test_database_password_never_shows_in_repr_errors_or_logs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket

    from dicom_assets.store import StateStore

    monkeypatch.setenv("DB_PASSWORD", "s3cret-pw")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    settings = settings_from_dict({**MINIMAL, "database": {"url": f"postgresql://u:${{DB_PASSWORD}}@127.0.0.1:{port}/db"}})
    assert settings.database.url.endswith(f"u:s3cret-pw@127.0.0.1:{port}/db")  # the real value is used
    logging.getLogger("test").warning("settings: %s / %r", settings, settings.database)
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in str(settings)
    assert "u:***@127.0.0.1" in repr(settings.database) and settings.database.masked_url.startswith("postgresql://u:***@")
    store = StateStore(settings.database.url)
    with pytest.raises(Exception) as failure:
        store.create_schema()
    store.dispose()
    assert "s3cret-pw" not in str(failure.value) and "s3cret-pw" not in repr(failure.value)
    with pytest.raises(ConfigError) as bad:
        settings_from_dict({**MINIMAL, "database": {"url": "mysql://u:${DB_PASSWORD}@h/db"}})
    assert "s3cret-pw" not in str(bad.value)
    assert "s3cret-pw" not in caplog.text


def test_selection_request_file_is_taken_from_the_config_directory(tmp_path: Path) -> None:
    """Like every other path, a relative request_file is relative to the config file, not to the cwd;
    it may be combined with a patient rule (a patient must pass both)."""
    (tmp_path / "irb").mkdir()
    (tmp_path / "irb" / "cohort.xlsx").write_bytes(b"not parsed at load")
    path = _write(
        tmp_path,
        "pacs: {host: 127.0.0.1, port: 4242, called_ae_title: ORTHANC}\n"
        "paths: {download_dir: dl, archive_dir: zips, report_dir: reports}\n"
        "selection: {patient_id_regex: '^0', request_file: irb/cohort.xlsx}\n",
    )
    selection = load_settings(path).selection
    assert selection.request_file == tmp_path / "irb" / "cohort.xlsx"
    assert selection.patient_id_regex == "^0"
    assert settings_from_dict(MINIMAL).selection.request_file is None
    rule = load_selection_rule(selection)  # the patient rule, applied to the rows' patients
    zero, plain = Dataset(), Dataset()
    zero.PatientID, plain.PatientID = "0123", "123"
    assert rule(zero) and not rule(plain)
    assert selection_rule_name(selection) == "selection.patient_id_regex /^0/"


def test_selection_request_file_errors_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "cohort.xls").write_text("old Excel")
    with pytest.raises(ConfigError, match=r"selection\.request_file: 'cohort\.xls' must be a \.csv or \.xlsx file"):
        settings_from_dict({**MINIMAL, "selection": {"request_file": "cohort.xls"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"selection\.request_file: .*missing\.csv does not exist \(a relative path is taken from"):
        settings_from_dict({**MINIMAL, "selection": {"request_file": "missing.csv"}}, base_dir=tmp_path)
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ConfigError, match=r"selection\.request_file: .*folder\.csv is not a file"):
        settings_from_dict({**MINIMAL, "selection": {"request_file": "folder.csv"}}, base_dir=tmp_path)
