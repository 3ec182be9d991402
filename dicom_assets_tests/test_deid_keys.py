"""Keyed pseudonyms, UIDs and date shifts: stable under one secret, different under another,
never revealing the secret."""

from __future__ import annotations

import re

import pytest

from dicom_assets.deid.keys import MIN_SECRET_BYTES, DeidKeys

SECRET = b"a test secret of more than 16 bytes"
OTHER = b"another test secret, also long enough"


def test_same_secret_same_values_across_instances() -> None:
    a, b = DeidKeys(SECRET), DeidKeys(SECRET)
    assert a.pseudonym("PID-1") == b.pseudonym("PID-1")
    assert a.uid("1.2.3.4.5") == b.uid("1.2.3.4.5")
    assert a.date_shift_days("PID-1") == b.date_shift_days("PID-1")


def test_other_secret_other_values() -> None:
    a, b = DeidKeys(SECRET), DeidKeys(OTHER)
    assert a.pseudonym("PID-1") != b.pseudonym("PID-1")
    assert a.uid("1.2.3.4.5") != b.uid("1.2.3.4.5")
    shifts = [(a.date_shift_days(f"P{i}"), b.date_shift_days(f"P{i}")) for i in range(20)]
    assert any(x != y for x, y in shifts)


def test_pseudonym_format_and_attempts() -> None:
    keys = DeidKeys(SECRET, pseudonym_prefix="STUDY7-", pseudonym_digits=6)
    first = keys.pseudonym("PID-1")
    assert re.fullmatch(r"STUDY7-\d{6}", first)
    assert keys.pseudonym("PID-1", attempt=0) == first
    retries = {keys.pseudonym("PID-1", attempt=n) for n in range(1, 6)}
    assert first not in retries and len(retries) == 5
    assert keys.pseudonym("PID-2") != first
    assert re.fullmatch(r"ANON\d{8}", DeidKeys(SECRET).pseudonym("x"))
    with pytest.raises(ValueError):
        keys.pseudonym("PID-1", attempt=-1)


def test_uids_are_valid_deterministic_and_distinct() -> None:
    keys = DeidKeys(SECRET)
    originals = [f"1.2.826.0.1.3680043.8.498.{i}" for i in range(2000)]
    new = [keys.uid(u) for u in originals]
    assert len(set(new)) == len(new)
    for uid in new:
        assert len(uid) <= 64 and re.fullmatch(r"2\.25\.(0|[1-9]\d*)", uid)
    assert keys.uid(originals[0] + "\x00") == new[0]  # padding is not part of the UID
    assert keys.uid(originals[0]) == new[0]  # cached or not, the same


def test_date_shift_range_and_stability() -> None:
    keys = DeidKeys(SECRET, max_shift_days=30)
    shifts = [keys.date_shift_days(f"P{i}") for i in range(500)]
    assert all(-30 <= s <= -1 for s in shifts)
    assert len(set(shifts)) > 20  # spread over the range
    assert keys.date_shift_days("P7") == DeidKeys(SECRET, max_shift_days=30).date_shift_days("P7")
    assert -3650 <= DeidKeys(SECRET).date_shift_days("P1") <= -1


def test_secret_never_shown() -> None:
    keys = DeidKeys(SECRET)
    assert SECRET.decode() not in repr(keys) and SECRET.decode() not in str(keys)
    short = b"short-secret"
    with pytest.raises(ValueError) as caught:
        DeidKeys(short)
    assert short.decode() not in str(caught.value) and str(MIN_SECRET_BYTES) in str(caught.value)
    with pytest.raises(TypeError):
        DeidKeys("a str secret of enough length")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"pseudonym_digits": 0}, {"pseudonym_prefix": "A^B"}, {"pseudonym_prefix": "x" * 60},
                                    {"max_shift_days": 0}])  # fmt: skip
def test_bad_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DeidKeys(SECRET, **kwargs)  # type: ignore[arg-type]
