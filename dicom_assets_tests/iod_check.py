"""An IOD check for tests: does a de-identified copy break the DICOM standard where its original did not?

Issue 12's done-when asks that ``dciodvfy`` (David Clunie's IOD verifier from Debian's
``dicom3tools``) "reports no new errors compared with the originals". Real PACS data often has
errors already (a vendor's bad enumerated value, an over-long description), so the test cannot ask
for zero errors: it compares the two files' error lists.

De-identification legitimately changes values (UIDs, dates, names, lengths), and dciodvfy quotes
values inside its messages, so an error the original already had would look "new" in the copy. The
messages are therefore normalised before the comparison: values, UIDs, dates and lengths are
replaced by placeholders while tags, attribute and module names stay. A "new error" is a new KIND of
error (a Type 1 attribute now missing, a value now invalid for its VR, an IOD no longer recognised),
not the same one with another value.

``dciodvfy`` writes everything to stderr (``Error - ...``, ``Warning - ...``, the IOD's name, and
``Abort - ...`` when it cannot read on) and exits 1 when it found an error. Without the tool, a test
calling :func:`require_dciodvfy` is skipped (fails under ``CI=true``, like the other services);
``scripts/ensure-services.sh`` installs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dicom_assets_tests.conftest import require_service

DCIODVFY = "dciodvfy"
TIMEOUT_S = 120.0

#: A line that reports an error: ``Error - ...``, possibly after a tag (``(0x0009,0x1001)  ?  - Error - ...``);
#: ``Abort - ...`` means dciodvfy stopped reading, which is an error too.
_ERROR_LINE = re.compile(r"(?:^|\s)(?:Error|Abort) - ")
_WARNING_LINE = re.compile(r"(?:^|\s)Warning - ")

#: (pattern, replacement) in order: values first (they may contain anything), then what is left.
_NORMALISERS: tuple[tuple[re.Pattern[str], str], ...] = (
    # "... PN [1] = <Dubois^Ingrid> - ...", "VL = <12>", "value is <x>", "meaning is <x>", "length is <7>"
    (re.compile(r"(=|\bis) <[^>]*>"), r"\1 <value>"),
    # "Unrecognized enumerated value <Q> for value 1 of attribute <Patient's Sex>", "defined term <X>"
    (re.compile(r"\b(value|term) <[^>]*>"), r"\1 <value>"),
    # "Character invalid for this VR = 'c' (0x63)", "bad character is 'x'"
    (re.compile(r"(=|\bis) '[^']*'(?: \(0x[0-9a-fA-F]+\))?"), r"\1 '<char>'"),
    # "Length invalid for this VR = 70, expected <= 64", "value length = 9"
    (re.compile(r"(?i)(length[A-Za-z ]*= )\d+"), r"\1<n>"),
    (re.compile(r"\b\d+(?:\.\d+){3,}\b"), "<uid>"),  # a UID outside brackets
    (re.compile(r"\b(?:19|20)\d{6}(?:\d{2,6}(?:\.\d{1,6})?)?\b"), "<date>"),  # DA / DT outside brackets
    (re.compile(r"\s+"), " "),
)  # fmt: skip


@dataclass(frozen=True)
class IodReport:
    """What dciodvfy said about one file: its IOD (``CTImage``; None if not recognised) and the
    error and warning lines, normalised (:func:`normalise_message`), in dciodvfy's order."""

    iod: str | None
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    raw: str


def dciodvfy_binary() -> str | None:
    """``dciodvfy`` on PATH, or None."""
    return shutil.which(DCIODVFY)


def require_dciodvfy() -> str:
    """The dciodvfy binary; skips the test without it (fails it under ``CI=true``)."""
    binary = dciodvfy_binary()
    require_service(binary is not None, "dciodvfy (Debian package 'dicom3tools'; see scripts/ensure-services.sh)")
    assert binary is not None
    return binary


def normalise_message(line: str) -> str:
    """``line`` with the values de-identification may change replaced by placeholders, so that the
    same kind of error on the same attribute reads the same in an original and in its copy."""
    for pattern, replacement in _NORMALISERS:
        line = pattern.sub(replacement, line)
    return line.strip()


def parse_report(output: str) -> IodReport:
    """Split dciodvfy's output into normalised errors and warnings and the IOD name it printed."""
    errors: list[str] = []
    warnings: list[str] = []
    iod: str | None = None
    for line in output.splitlines():
        if _ERROR_LINE.search(line):
            errors.append(normalise_message(line))
        elif _WARNING_LINE.search(line):
            warnings.append(normalise_message(line))
        elif re.fullmatch(r"[A-Za-z0-9]+", line.strip()):
            iod = line.strip()  # dciodvfy names the IOD it checked against on a line of its own
    return IodReport(iod, tuple(errors), tuple(warnings), output)


def iod_report(path: Path, binary: str | None = None) -> IodReport:
    """Run dciodvfy on ``path`` and parse what it says. Raises FileNotFoundError for a missing file
    (a broken test, not an IOD error) and RuntimeError if dciodvfy is missing or crashes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    binary = binary or dciodvfy_binary()
    if binary is None:
        raise RuntimeError("dciodvfy is not installed (Debian package dicom3tools; see scripts/ensure-services.sh)")
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)
    if done.returncode not in (0, 1):  # 1: errors found; a signal or anything else: the tool broke
        raise RuntimeError(f"dciodvfy exited {done.returncode} on {path}: {(done.stderr or done.stdout)[-2000:]}")
    return parse_report(done.stdout + done.stderr)


def iod_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for ``path``, normalised; [] for a file it finds no error in."""
    return list(iod_report(path).errors)


def new_iod_errors(original: Path, deidentified: Path) -> list[str]:
    """The errors the de-identified copy has and its original has not, counted: the same
    normalised error twice in the copy and once in the original is one new error."""
    return new_messages(iod_errors(original), iod_errors(deidentified))


def new_messages(before: list[str], after: list[str]) -> list[str]:
    """``after`` minus ``before`` as multisets, in ``after``'s order."""
    extra = Counter(after) - Counter(before)
    new: list[str] = []
    for message in after:
        if extra[message] > 0:
            extra[message] -= 1
            new.append(message)
    return new
