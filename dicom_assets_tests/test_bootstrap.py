"""scripts/bootstrap.sh's interpreter choice and version check, with fake interpreters (no venv, no pip)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

BOOTSTRAP = Path(__file__).resolve().parents[1] / "scripts" / "bootstrap.sh"


def _fake_python(path: Path, version: str | None) -> Path:
    """A stand-in interpreter: prints ``version`` when asked for sys.version_info and succeeds at
    anything else (so `-m venv` and `-m pip` do nothing); ``None``: does not run, like a pyenv shim of a
    version that is not selected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if version is None:
        path.write_text("#!/bin/sh\necho \"pyenv: $0: command not found\" >&2\nexit 127\n")
    else:
        path.write_text(f'#!/bin/sh\ncase "$*" in *version_info*) echo {version} ;; esac\nexit 0\n')
    path.chmod(0o755)
    return path


def _bootstrap(*args: str, cwd: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path} if path is not None else None
    return subprocess.run(["/bin/bash", str(BOOTSTRAP), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("version", ["3.10.13", "3.14.0"])
def test_unsupported_python_is_refused_before_any_venv(tmp_path: Path, version: str) -> None:
    python = _fake_python(tmp_path / "bin" / "python3", version)
    done = _bootstrap(str(python), str(tmp_path / "venv"), cwd=tmp_path)
    assert done.returncode == 1
    assert f"{python} is Python {version}; dicom_assets needs Python 3.11, 3.12 or 3.13" in done.stderr
    assert "make PYTHON=/path/to/python3.12 install" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_python_that_does_not_run_is_refused(tmp_path: Path) -> None:
    done = _bootstrap(str(tmp_path / "no-such-python"), str(tmp_path / "venv"), cwd=tmp_path)
    assert done.returncode == 1
    assert "is not a working Python; dicom_assets needs Python 3.11, 3.12 or 3.13" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("version", ["3.11.2", "3.12.3", "3.13.5"])
def test_supported_python_gets_past_the_check(tmp_path: Path, version: str) -> None:
    python = _fake_python(tmp_path / "bin" / "python3", version)
    done = _bootstrap(str(python), str(tmp_path / "venv"), cwd=tmp_path)
    # The fake's `-m venv` creates nothing, so the script stops at the venv's pip.
    assert f"creating {tmp_path / 'venv'} with {python} (Python {version})" in done.stdout
    assert "needs Python" not in done.stderr


@pytest.mark.parametrize(
    ("interpreters", "chosen"),
    [
        ({"python3": "3.12.3", "python3.13": "3.13.5", "python3.11": "3.11.2"}, "python3"),  # python3 kept
        ({"python3": "3.10.13", "python3.13": None, "python3.12": "3.12.1", "python3.11": "3.11.7"}, "python3.12"),
        ({"python3": "3.14.0", "python3.11": "3.11.7"}, "python3.11"),
    ],
)
def test_which_python_keeps_python3_else_the_newest_supported(tmp_path: Path, interpreters: dict[str, str | None], chosen: str) -> None:
    for name, version in interpreters.items():
        _fake_python(tmp_path / "bin" / name, version)
    done = _bootstrap("--which-python", cwd=tmp_path, path=str(tmp_path / "bin"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "bin" / chosen)


def test_which_python_without_a_supported_one_names_python3(tmp_path: Path) -> None:
    _fake_python(tmp_path / "bin" / "python3", "3.10.13")
    done = _bootstrap("--which-python", cwd=tmp_path, path=str(tmp_path / "bin"))
    assert done.stdout.strip() == "python3"  # which the version check then refuses, naming 3.10.13


def test_existing_venv_is_kept_whatever_python_says(tmp_path: Path) -> None:
    _fake_python(tmp_path / "venv" / "bin" / "python", "3.11.7")
    python = _fake_python(tmp_path / "bin" / "python3.13", "3.13.5")
    done = _bootstrap(str(python), str(tmp_path / "venv"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"keeping {tmp_path / 'venv'} (Python 3.11.7), not {python} (Python 3.13.5)" in done.stderr
    assert "creating" not in done.stdout


def test_existing_venv_of_an_unsupported_python_is_refused(tmp_path: Path) -> None:
    _fake_python(tmp_path / "venv" / "bin" / "python", "3.10.13")
    python = _fake_python(tmp_path / "bin" / "python3.12", "3.12.1")
    done = _bootstrap(str(python), str(tmp_path / "venv"), cwd=tmp_path)
    assert done.returncode == 1
    assert f"{tmp_path / 'venv' / 'bin' / 'python'} is Python 3.10.13" in done.stderr
    assert "make clean" in done.stderr
