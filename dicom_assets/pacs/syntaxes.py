"""Transfer syntaxes: which are lossy, and which instances a PACS transcoded on the way.

A PACS should send an instance as it stores it. When it says how it stores it (IMAGE-level
Available Transfer Syntax UID) and sends it otherwise, the instance was transcoded: worth
recording whatever the syntaxes (the bytes differ from the archive's), and a defect when the
result is lossy and the original was not (pixel data lost for good). Some PACS do not say
(Orthanc 1.10 answers the key empty): then nothing can be concluded, and the received syntax is
still recorded per instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

#: Lossy syntaxes: JPEG baseline/extended, JPEG-LS near-lossless, JPEG 2000 (lossy or either),
#: JPEG 2000 part 2 (either), MPEG-2/-4/HEVC, HTJ2K (lossy or either).
LOSSY_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1", "1.2.840.10008.1.2.4.101",
        "1.2.840.10008.1.2.4.101.1", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.102.1",
        "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.103.1", "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.104.1", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.105.1",
        "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.106.1", "1.2.840.10008.1.2.4.107",
        "1.2.840.10008.1.2.4.108", "1.2.840.10008.1.2.4.203",
    }
)  # fmt: skip


def is_lossy(syntax: str | None) -> bool:
    return syntax in LOSSY_SYNTAXES


@dataclass(frozen=True)
class Transcoding:
    """The instances of one retrieve that did not arrive as the PACS stores them."""

    transcoded: tuple[str, ...] = ()  # SOP Instance UIDs received in another syntax than stored
    lossy: tuple[str, ...] = ()  # ... of which lossy-compressed from a lossless original

    def describe(self, arrived: Mapping[str, str], stored: Mapping[str, str | None]) -> str:
        """``N instance(s) lossy-compressed by the PACS although it stores them lossless (a -> b, ...)``."""
        pairs = sorted({f"{stored.get(uid)} -> {arrived[uid]}" for uid in self.lossy})
        return (
            f"the PACS sent {len(self.lossy)} instance(s) lossy-compressed although it stores them "
            f"lossless ({', '.join(pairs)})"
        )


def transcodings(arrived: Mapping[str, str], stored: Mapping[str, str | None]) -> Transcoding:
    """Compare each arrived instance's syntax (UID -> syntax) with the stored one the PACS named."""
    transcoded, lossy = [], []
    for uid, syntax in sorted(arrived.items()):
        original = stored.get(uid)
        if original and syntax != original:
            transcoded.append(uid)
            if is_lossy(syntax) and not is_lossy(original):
                lossy.append(uid)
    return Transcoding(tuple(transcoded), tuple(lossy))
