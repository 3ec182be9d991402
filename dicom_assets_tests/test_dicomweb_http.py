"""DicomwebHttp and the dicomweb: config section: budget, retries, clear errors, masked secrets.

A tiny scripted HTTP server on 127.0.0.1 plays the 503/429 server; a closed loopback port the
unreachable one; Orthanc with the DICOMweb plugin and a registered user the 401.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from dicom_assets.config import ConfigError, load_settings, settings_from_dict
from dicom_assets.config_dicomweb import DicomwebSettings
from dicom_assets.dicomweb.http import (
    DicomwebAuthError,
    DicomwebHttp,
    DicomwebRequestFailed,
    DicomwebUnavailable,
    retry_after_s,
)
from dicom_assets.pacs.budget import SlidingWindowBudget
from dicom_assets.pacs.errors import PacsUnreachable
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.orthanc import running_orthanc

PASSWORD = "s3cret-Pa55word"

# -- a scripted server ------------------------------------------------------------------------------


class Scripted:
    """Answers requests from a script of (status, headers, body); the last entry repeats."""

    def __init__(self, script: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.script = script
        self.seen: list[dict[str, Any]] = []
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                scripted.seen.append({"path": self.path, "headers": dict(self.headers)})
                index = min(len(scripted.seen), len(scripted.script)) - 1
                status, headers, body = scripted.script[index]
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[Scripted] = []

    def start(*script: tuple[int, dict[str, str], bytes]) -> Scripted:
        server = Scripted(list(script))
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.server.shutdown()
        server.server.server_close()


def settings(url: str, **extra: Any) -> DicomwebSettings:
    return DicomwebSettings(url=url, timeout_s=5, **extra)


class Sleeps(list):
    """A sleep that records the delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


JSON_OK = (200, {"Content-Type": "application/dicom+json"}, json.dumps([{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]).encode())


# -- retries ------------------------------------------------------------------------------------------


def test_503_and_429_with_retry_after_are_retried_and_every_request_counted(scripted: Any) -> None:
    """503 (Retry-After in seconds), 429 (Retry-After as an HTTP date), then the answer: three
    requests, three budget tokens, waits of at least what the server asked for."""
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=4), usegmt=True)
    server = scripted((503, {"Retry-After": "3"}, b"busy"), (429, {"Retry-After": later}, b"slow down"), JSON_OK)
    budget = SlidingWindowBudget(100)
    budget.resets = 0  # type: ignore[attr-defined]
    budget.note_reset = lambda: setattr(budget, "resets", budget.resets + 1)  # type: ignore[attr-defined]
    sleeps = Sleeps()
    with DicomwebHttp(settings(server.url), budget, backoff_initial_s=0.01, backoff_max_s=0.05, sleep=sleeps) as http:
        found = http.get_json("studies", {"PatientID": "PAT-001"})
    assert found == [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]
    assert http.requests == budget.total == len(server.seen) == 3
    assert budget.resets == 1  # the 429 slows the shared (adaptive) budget down
    assert sleeps[0] >= 3.0 and 2.0 <= sleeps[1] <= 4.5  # honoured, not the 0.01 s backoff
    assert all(s["path"].startswith("/dicom-web/studies?PatientID=PAT-001") for s in server.seen)


def test_503_forever_gives_up_after_wait_for_server_s(scripted: Any) -> None:
    server = scripted((503, {}, b"maintenance"))
    budget = SlidingWindowBudget(1000)
    http = DicomwebHttp(settings(server.url), budget, backoff_initial_s=0.05, backoff_max_s=0.1, wait_for_server_s=0.5)
    with pytest.raises(DicomwebUnavailable, match=r"503 Service Unavailable \(for 0.5 s\)") as info:
        http.get_json("studies")
    http.close()
    assert server.url in str(info.value)
    assert isinstance(info.value, PacsUnreachable)  # the pipeline stops the run, no attempt used
    assert http.requests == budget.total == len(server.seen) >= 3


def test_unreachable_server_gives_a_clear_error_after_wait_for_server_s() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nobody listens
    budget = SlidingWindowBudget(1000)
    http = DicomwebHttp(settings(url), budget, backoff_initial_s=0.05, backoff_max_s=0.2, wait_for_server_s=1)
    with pytest.raises(DicomwebUnavailable) as info:
        http.get_json("studies")
    http.close()
    assert str(info.value).startswith(f"cannot reach the DICOMweb server {url}: connection refused (for 1 s)")
    assert http.requests == budget.total >= 2


def test_other_errors_raise_at_once_with_the_servers_message(scripted: Any) -> None:
    server = scripted((400, {"Content-Type": "application/json"}, json.dumps({"Message": "Bad tag 'Foo'"}).encode()))
    http = DicomwebHttp(settings(server.url), SlidingWindowBudget(100))
    with pytest.raises(DicomwebRequestFailed) as info:
        http.get_json("studies", {"Foo": "x"})
    http.close()
    assert info.value.status == 400 and info.value.server_message == "Bad tag 'Foo'"
    assert f"GET {server.url}/studies:" in str(info.value) and "Foo=x" not in str(info.value)
    assert len(server.seen) == 1


def test_204_is_an_empty_answer(scripted: Any) -> None:
    server = scripted((204, {}, b""))
    with DicomwebHttp(settings(server.url), SlidingWindowBudget(100)) as http:
        assert http.get_json("studies") == []


def test_retry_after_forms() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Mon, 01 Jan 2024 12:00:30 GMT", now=lambda: now) == 30.0
    assert retry_after_s("Mon, 01 Jan 2024 11:00:00 GMT", now=lambda: now) == 0.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


# -- streaming and auth ---------------------------------------------------------------------------------


def test_stream_leaves_the_body_to_the_caller_and_sends_bearer_auth(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"x" * 1_000_000
    server = scripted((200, {"Content-Type": 'multipart/related; type="application/dicom"'}, body))
    monkeypatch.setenv("PACS_TOKEN", "tok-123")
    web = _settings_from_config({"url": server.url, "auth": "bearer", "token": "${PACS_TOKEN}", "wado_prefix": "wado"})
    with DicomwebHttp(web, SlidingWindowBudget(100)) as http:
        with http.stream("studies/1.2/series/3.4", {"Accept": 'multipart/related; type="application/dicom"'}) as response:
            assert not response.is_stream_consumed
            assert sum(len(c) for c in response.iter_bytes()) == len(body)
        assert http.requests == 1
    assert server.seen[0]["path"] == "/dicom-web/wado/studies/1.2/series/3.4"
    assert server.seen[0]["headers"]["Authorization"] == "Bearer tok-123"


def test_401_from_orthanc_names_the_url_and_auth_mode_never_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("PACS_USERNAME", "alice")
    with running_orthanc(tmp_path, free_port(), dicomweb=True, users={"alice": PASSWORD}, wait_on_stop=False) as orthanc:
        url = orthanc.dicomweb_url
        for password, expect in (("wrong-password", None), (PASSWORD, [])):
            monkeypatch.setenv("PACS_PASSWORD", password)
            web = _settings_from_config({"url": url, "auth": "basic", "username": "${PACS_USERNAME}", "password": "${PACS_PASSWORD}"})
            budget = SlidingWindowBudget(100)
            with DicomwebHttp(web, budget, wait_for_server_s=5) as http:
                if expect is None:
                    with pytest.raises(DicomwebAuthError) as info:
                        http.get_json("studies")
                    message = str(info.value)
                    assert f"{url}/studies" in message and "dicomweb.auth: basic" in message and "401" in message
                    assert "dicomweb.password" in message and "wrong-password" not in message
                    assert http.requests == budget.total == 1  # never retried
                else:
                    assert http.get_json("studies") == expect
        with DicomwebHttp(settings(url), SlidingWindowBudget(100)) as http, pytest.raises(DicomwebAuthError) as info:
            http.get_json("studies")
        assert "dicomweb.auth: none" in str(info.value) and "set dicomweb.auth" in str(info.value)
    assert PASSWORD not in caplog.text and "wrong-password" not in caplog.text


# -- the config section ------------------------------------------------------------------------------


def _config(dicomweb: dict[str, Any] | None, **pacs: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "pacs": {"host": "127.0.0.1", "port": 4242, "called_ae_title": "PACS", **pacs},
        "paths": {"download_dir": "dl", "archive_dir": "zips", "report_dir": "reports"},
    }
    if dicomweb is not None:
        raw["dicomweb"] = dicomweb
    return raw


def _settings_from_config(dicomweb: dict[str, Any]) -> DicomwebSettings:
    section = settings_from_dict(_config(dicomweb, protocol="dicomweb")).dicomweb
    assert section is not None
    return section


def test_config_defaults_keep_dimse() -> None:
    settings_ = settings_from_dict(_config(None))
    assert settings_.pacs.protocol == "dimse" and settings_.dicomweb is None


def test_config_dicomweb_protocol_needs_the_section() -> None:
    with pytest.raises(ConfigError, match=r"pacs.protocol: dicomweb needs a dicomweb: section"):
        settings_from_dict(_config(None, protocol="dicomweb"))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"url": "ftp://pacs/dicom-web"}, "dicomweb.url: must be an http:// or https:// URL"),
        ({"url": "https://bob:pw@pacs/dicom-web"}, "must not carry credentials"),
        ({"url": "https://pacs/dw", "auth": "basic", "username": "bob", "password": PASSWORD}, "dicomweb.password: must be an environment reference"),
        ({"url": "https://pacs/dw", "auth": "bearer", "token": "abc"}, "dicomweb.token: must be an environment reference"),
        ({"url": "https://pacs/dw", "auth": "bearer"}, "dicomweb.token is required with dicomweb.auth: bearer"),
        ({"url": "https://pacs/dw", "token": "${PACS_TOKEN}"}, "dicomweb.token is set but dicomweb.auth is 'none'"),
        ({"url": "https://pacs/dw", "qido_prefix": "../x"}, "dicomweb.qido_prefix: must be a path"),
    ],
)
def test_config_refuses(section: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_TOKEN", "abc")
    with pytest.raises(ConfigError, match=message) as info:
        settings_from_dict(_config(section, protocol="dicomweb"))
    assert PASSWORD not in str(info.value)


def test_config_secrets_masked_and_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_USERNAME", "alice")
    monkeypatch.setenv("PACS_PASSWORD", PASSWORD)
    web = _settings_from_config({
        "url": "https://PACS.example.org/dicom-web/", "auth": "basic", "username": "${PACS_USERNAME}",
        "password": "${PACS_PASSWORD}", "qido_prefix": "qido-rs", "wado_prefix": "https://wado.example.org/rs",
    })  # fmt: skip
    assert PASSWORD not in repr(web) and PASSWORD not in str(web.model_dump())
    assert web.password is not None and web.password.get_secret_value() == PASSWORD
    assert web.qido_root == "https://PACS.example.org/dicom-web/qido-rs"
    assert web.wado_root == "https://wado.example.org/rs"
    assert web.budget_key() == "https://pacs.example.org:443/dicom-web"


def test_config_max_concurrent_requests_is_the_same_limit() -> None:
    assert settings_from_dict(_config(None, max_concurrent_requests=5)).pacs.max_concurrent_associations == 5
    assert settings_from_dict(_config(None, max_concurrent_associations=3)).pacs.max_concurrent_associations == 3
    with pytest.raises(ConfigError, match="not both"):
        settings_from_dict(_config(None, max_concurrent_associations=3, max_concurrent_requests=5))


def test_config_sample_dicomweb_section_loads_uncommented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commented-out dicomweb: block of config-sample.yaml, uncommented one level, is valid."""
    monkeypatch.setenv("DICOM_ASSETS_DB_PASSWORD", "secret")
    lines = (Path(__file__).resolve().parents[1] / "config-sample.yaml").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("# dicomweb:")))
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    text = "\n".join(lines[:start] + block).replace("protocol: dimse ", "protocol: dicomweb ")
    (tmp_path / "config.yaml").write_text(text)
    settings_ = load_settings(tmp_path / "config.yaml")
    assert settings_.pacs.protocol == "dicomweb"
    assert settings_.dicomweb is not None and settings_.dicomweb.url == "https://pacs.example.org/dicom-web"


def test_a_redirect_is_an_error_not_an_answer(scripted: Any) -> None:
    server = scripted((302, {"Location": "https://sso.example.org/login?next=x"}, b"<html>login</html>"))
    with DicomwebHttp(settings(server.url), SlidingWindowBudget(100)) as http, pytest.raises(DicomwebRequestFailed) as info:
        with http.stream("studies/1/series/2"):
            pass
    assert "redirected (302) to https://sso.example.org/login" in str(info.value) and "next=x" not in str(info.value)
