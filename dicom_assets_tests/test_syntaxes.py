"""Which instances a PACS transcoded, from the syntax each arrived in and the one it stores."""

from __future__ import annotations

from dicom_assets.pacs.syntaxes import is_lossy, transcodings

EXPLICIT, JPEG_LOSSLESS, JPEG_BASELINE, J2K_LOSSLESS, J2K = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
)  # fmt: skip


def test_lossy_syntaxes() -> None:
    assert is_lossy(JPEG_BASELINE) and is_lossy(J2K) and is_lossy("1.2.840.10008.1.2.4.81")
    assert not any(is_lossy(s) for s in (EXPLICIT, JPEG_LOSSLESS, J2K_LOSSLESS, "1.2.840.10008.1.2.5", None))


def test_transcoded_and_lossy_transcoded_instances() -> None:
    arrived = {"1": EXPLICIT, "2": JPEG_BASELINE, "3": J2K, "4": JPEG_LOSSLESS, "5": EXPLICIT}
    stored = {"1": J2K_LOSSLESS, "2": EXPLICIT, "3": J2K, "4": None}  # 4: not said; 5: not listed
    found = transcodings(arrived, stored)
    assert found.transcoded == ("1", "2")  # decompressed (lossless either way) and lossy-compressed
    assert found.lossy == ("2",)
    assert "1 instance(s) lossy-compressed" in found.describe(arrived, stored)
    assert f"{EXPLICIT} -> {JPEG_BASELINE}" in found.describe(arrived, stored)
    assert transcodings({"9": JPEG_BASELINE}, {"9": JPEG_BASELINE}).transcoded == ()  # stored lossy, sent as stored
