"""Keyed pseudonyms, UIDs and date shifts: HMAC-SHA256 under one secret.

Why keyed: the same patient must get the same pseudonym, UIDs and date shift in every run and on
every worker (a patient who gains a series next month must land in the same de-identified
study), without a lookup table that could be lost or leak. A plain hash would do that too, but
PatientIDs and UIDs come from small, guessable spaces: anyone could hash every MRN and reverse
the mapping. An HMAC under a secret only the honest broker holds cannot be reversed or
recomputed without it.

Each derived value uses its own message prefix (``pseudonym``, ``uid``, ``shift``), so one
output never tells anything about another even for equal inputs. The secret is kept in a
private attribute, never in ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["DeidKeys", "MIN_SECRET_BYTES", "UID_ROOT"]

#: Shorter secrets are refused: the point of the key is that it cannot be guessed.
MIN_SECRET_BYTES = 16
#: UIDs derived from a 128-bit number (PS3.5 B.2: "2.25." + the decimal of a UUID-sized integer).
UID_ROOT = "2.25."
_MAX_PSEUDONYM_LENGTH = 64  # PatientID is LO, a PN component 64 characters
_UID_CACHE_LIMIT = 200_000  # ~40 MB at most; a cohort's study/series UIDs repeat in every instance


class DeidKeys:
    """The HMAC-derived values of one secret. ``pseudonym_prefix`` + ``pseudonym_digits`` digits
    make a pseudonym; date shifts are whole days in ``[-max_shift_days, -1]``."""

    __slots__ = ("_mac", "_prefix", "_digits", "_max_shift", "_uids")

    def __init__(self, secret: bytes, pseudonym_prefix: str = "ANON", pseudonym_digits: int = 8, max_shift_days: int = 3650) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError("the de-identification secret must be bytes")
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the de-identification secret is shorter than {MIN_SECRET_BYTES} bytes")
        if not 1 <= pseudonym_digits <= 40:
            raise ValueError(f"pseudonym_digits must be 1..40, not {pseudonym_digits}")
        if len(pseudonym_prefix) + pseudonym_digits > _MAX_PSEUDONYM_LENGTH or any(
            c in "\\^=" or not c.isprintable() for c in pseudonym_prefix
        ):
            raise ValueError("pseudonym_prefix must be printable, without \\ ^ or =, and fit a 64-character PatientID")
        if max_shift_days < 1:
            raise ValueError(f"max_shift_days must be at least 1, not {max_shift_days}")
        self._mac = hmac.new(bytes(secret), digestmod=hashlib.sha256)
        self._prefix = pseudonym_prefix
        self._digits = pseudonym_digits
        self._max_shift = max_shift_days
        self._uids: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"DeidKeys(prefix={self._prefix!r}, digits={self._digits}, max_shift_days={self._max_shift}, secret=<hidden>)"

    def _digest(self, *parts: bytes) -> int:
        mac = self._mac.copy()
        mac.update(b"\x00".join(parts))
        return int.from_bytes(mac.digest(), "big")

    def pseudonym(self, patient_id: str, attempt: int = 0) -> str:
        """``prefix`` + ``digits`` decimal digits of HMAC(secret, patient_id). A caller that finds
        the pseudonym taken by another patient asks again with ``attempt`` 1, 2, ..."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        parts = [b"pseudonym", patient_id.encode("utf-8")]
        if attempt:
            parts.append(str(attempt).encode("ascii"))
        number = self._digest(*parts) % 10**self._digits
        return f"{self._prefix}{number:0{self._digits}d}"

    def uid(self, original_uid: str) -> str:
        """``2.25.`` + the decimal of 128 bits of HMAC(secret, UID): at most 44 characters, the same
        for the same original everywhere (references stay consistent), one-way without the secret."""
        original = original_uid.strip("\x00 ")
        new = self._uids.get(original)
        if new is None:
            new = UID_ROOT + str(self._digest(b"uid", original.encode("ascii", "replace")) >> 128)
            if len(self._uids) >= _UID_CACHE_LIMIT:
                self._uids.clear()
            self._uids[original] = new
        return new

    def date_shift_days(self, patient_id: str) -> int:
        """Whole days in ``[-max_shift_days, -1]`` from HMAC(secret, patient_id): stable per patient,
        never 0 (an unshifted date would be the original)."""
        return -(1 + self._digest(b"shift", patient_id.encode("utf-8")) % self._max_shift)
