"""What can go wrong talking to a PACS, sorted the way retrying needs it.

Two kinds of fault get two budgets (:mod:`dicom_assets.pacs.faults`):

* a **connection fault** (:class:`PacsUnavailable`: refused, reset, aborted, timed out) says
  nothing about the series; it is waited out, for as long as ``pacs.wait_for_pacs_s`` allows
  per outage, and never uses up a series' attempts;
* an **answer of the PACS** (:class:`PacsRequestFailed`, a failed or partial retrieve) says
  something about the request; A7xx/C0xx answers are retried after a backoff, and a series gets
  ``pacs.max_attempts`` attempts that brought nothing new before it is given up.
"""

from __future__ import annotations


class PacsError(RuntimeError):
    """A PACS operation failed; the message says which and why."""


class PacsUnavailable(PacsError):
    """No association could be made or it broke mid-request (refused, reset, aborted, timed out).

    ``reset``: the PACS (or the network) reset or aborted an association, as opposed to refusing
    a new connection or going silent; resets slow the shared request budget down.
    """

    def __init__(self, message: str, reset: bool = False) -> None:
        super().__init__(message)
        self.reset = reset


class PacsUnreachable(PacsError):
    """The PACS made no progress for ``pacs.wait_for_pacs_s``: the run stops (no attempt used)."""


class MoveDestinationUnknown(PacsError):
    """The PACS does not know our storage SCP's AE title (status A801)."""


class PacsRequestFailed(PacsError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def transient_status(status: int | None) -> bool:
    """A7xx (refused: out of resources) and C0xx (unable to process): back off and try again."""
    return status is not None and (0xA700 <= status <= 0xA7FF or 0xC000 <= status <= 0xCFFF)


def is_connection_fault(exc: BaseException) -> bool:
    """The network or the PACS's listener failed us; the request itself was never answered."""
    return isinstance(exc, PacsUnavailable)


def is_transient(exc: BaseException) -> bool:
    """Worth another try after a backoff: connection faults and A7xx/C0xx statuses."""
    if is_connection_fault(exc):
        return True
    return isinstance(exc, PacsRequestFailed) and transient_status(exc.status)
