"""Decoding a stored instance so an uncompressed transfer syntax can carry it.

The bundled PACS sends every instance as stored when the peer accepted its (SOP class, stored
syntax). When it did not, a PACS that transcodes (Orthanc's default, and the bundled PACS with
``transcode_to_explicit=True``) decodes the file and sends the pixels uncompressed: lossy JPEG
arrives decompressed, and what it has no decoder for fails. This module is that decoding step;
:mod:`dicom_assets.devpacs.sending` decides when it runs.

Decoders, tried in order:

1. Little Endian uncompressed syntaxes (implicit, explicit, deflated): nothing to decode; pydicom
   reads the file and pynetdicom re-encodes its elements in the accepted syntax. Lossless.
2. pydicom's pixel decoders (``Dataset.decompress``): RLE with numpy alone; JPEG, JPEG-LS and
   JPEG 2000 only when a plugin (pylibjpeg, GDCM, Pillow) is installed in the environment.
3. DCMTK's command-line decoders, the codecs Orthanc itself is built on: ``dcmdjpeg`` (JPEG
   processes 1, 2-4, 14, 14 SV1), ``dcmdjpls`` (JPEG-LS), ``dcmdrle`` (RLE) and ``dcmconv +te`` for
   Explicit VR Big Endian (its OW values need the byte swap pydicom leaves to the caller).

JPEG 2000 without a pydicom plugin has no decoder here, as in Debian's Orthanc 1.10 ("Cannot
transcode ... from transfer syntax 1.2.840.10008.1.2.4.90"): :class:`CannotTranscode`.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

__all__ = ["CannotTranscode", "UNCOMPRESSED_LITTLE_ENDIAN", "decode_to_native"]

LOGGER = logging.getLogger("dicom_assets.devpacs")
#: Syntaxes pynetdicom converts between by re-encoding elements only (no pixel decoding).
UNCOMPRESSED_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})
_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")
_DCMTK_DECODERS: dict[str, tuple[str, ...]] = {
    **{syntax: ("dcmdjpeg", "+te") for syntax in _JPEG},
    "1.2.840.10008.1.2.4.80": ("dcmdjpls", "+te"),
    "1.2.840.10008.1.2.4.81": ("dcmdjpls", "+te"),
    "1.2.840.10008.1.2.5": ("dcmdrle", "+te"),
    "1.2.840.10008.1.2.2": ("dcmconv", "+te"),
}
_TOOL_TIMEOUT_S = 120


class CannotTranscode(Exception):
    """No decoder for the stored syntax (or the decoder failed); the message says which."""


def decode_to_native(path: Path, stored_syntax: str, read: Callable[[Path], Dataset]) -> Dataset:
    """The instance at ``path`` as a dataset with native (uncompressed, Little Endian) pixel data.

    ``read`` loads a whole file (the server's reader, so every full read goes through one place).
    Raises :class:`CannotTranscode` when no decoder handles ``stored_syntax``.
    """
    if stored_syntax in UNCOMPRESSED_LITTLE_ENDIAN:
        return read(path)
    syntax = UID(stored_syntax)
    if syntax.is_compressed and _pydicom_can_decode(syntax):
        try:
            ds = read(path)
            ds.decompress(generate_instance_uid=False)  # a transcoding PACS keeps the SOP Instance UID
            return ds
        except Exception as exc:  # noqa: BLE001 - a plugin that fails leaves the next decoder to try
            LOGGER.info("pydicom could not decode %s (%s): %s", path.name, syntax.name, exc)
    command = _DCMTK_DECODERS.get(stored_syntax)
    if command is not None and shutil.which(command[0]):
        return _decode_with_dcmtk(command, path, read)
    raise CannotTranscode(f"no decoder for {syntax.name} ({stored_syntax})")


def _pydicom_can_decode(syntax: UID) -> bool:
    """Whether one of pydicom's decoding plugins for ``syntax`` is installed."""
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False  # a syntax pydicom has no decoder for at all


def _decode_with_dcmtk(command: tuple[str, ...], path: Path, read: Callable[[Path], Dataset]) -> Dataset:
    """Run a DCMTK decoder into a temporary file and load the result (Explicit VR LE, ``+te``)."""
    with tempfile.TemporaryDirectory(prefix="devpacs-transcode-") as work:
        output = Path(work) / "decoded.dcm"
        try:
            done = subprocess.run([*command, str(path), str(output)], capture_output=True, timeout=_TOOL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise CannotTranscode(f"{command[0]} took more than {_TOOL_TIMEOUT_S} s on {path.name}") from exc
        if done.returncode != 0 or not output.exists():
            message = (done.stderr or done.stdout).decode(errors="replace").strip()[-500:]
            raise CannotTranscode(f"{command[0]} failed on {path.name}: {message}")
        return read(output)  # read whole (no deferred values): the file goes with the directory
