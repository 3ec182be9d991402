"""Presentation contexts: which SOP classes and transfer syntaxes we propose and accept.

Refusing a storage SOP class or a compressed transfer syntax makes PACS sub-operations fail
silently for that modality, so the receiver accepts every storage class pynetdicom knows with
every transfer syntax pydicom knows.

A C-GET association must propose the storage classes itself, has room for 128 contexts, and the
PACS accepts one syntax per context. Offered one context per class listing many syntaxes, a
PACS picks its favourite (Orthanc: Explicit VR Little Endian) and transcodes every instance to
it: lossy JPEG decompressed, JPEG 2000 not at all ("Cannot transcode"). So when the series' SOP
classes are known (IMAGE-level C-FIND), C-GET proposes **one context per (class, syntax)**, and
the PACS can send every instance as it stores it (:func:`series_get_plan`: several
associations when the classes need more than 128 contexts). Only when the classes are unknown
does it fall back to one context per class for pynetdicom's 120 most common classes.
"""

from __future__ import annotations

from typing import Sequence

from pydicom.uid import AllTransferSyntaxes, UID
from pynetdicom import AllStoragePresentationContexts, StoragePresentationContexts
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext, build_context, build_role
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

#: Uncompressed syntaxes first (preferred), then every compressed one, so nothing is refused.
TRANSFER_SYNTAXES: list[UID] = [
    UID("1.2.840.10008.1.2.1"),  # Explicit VR Little Endian
    UID("1.2.840.10008.1.2"),  # Implicit VR Little Endian
] + [ts for ts in AllTransferSyntaxes if ts not in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")]

STORAGE_SOP_CLASSES: list[UID] = [UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
CGET_STORAGE_SOP_CLASSES: list[UID] = [UID(cx.abstract_syntax) for cx in StoragePresentationContexts]

FIND_MODELS = {"patient": PatientRootQueryRetrieveInformationModelFind, "study": StudyRootQueryRetrieveInformationModelFind}
MOVE_MODELS = {"patient": PatientRootQueryRetrieveInformationModelMove, "study": StudyRootQueryRetrieveInformationModelMove}
GET_MODELS = {"patient": PatientRootQueryRetrieveInformationModelGet, "study": StudyRootQueryRetrieveInformationModelGet}

QUERY_SYNTAXES = [UID("1.2.840.10008.1.2.1"), UID("1.2.840.10008.1.2")]


def query_contexts() -> list[PresentationContext]:
    """What a find/move requestor proposes: verification and every query/retrieve model."""
    contexts = [build_context(Verification, QUERY_SYNTAXES)]
    for model in (*FIND_MODELS.values(), *MOVE_MODELS.values()):
        contexts.append(build_context(model, QUERY_SYNTAXES))
    return contexts


def get_contexts() -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """The fallback C-GET proposal (classes unknown): one context per storage class listing every
    syntax, for pynetdicom's 120 most common classes (<= 128 contexts). The PACS picks one
    syntax per class and may transcode to it."""
    contexts = _get_query_contexts()
    storage = CGET_STORAGE_SOP_CLASSES[: MAX_CONTEXTS - len(contexts)]
    contexts += [build_context(uid, TRANSFER_SYNTAXES) for uid in storage]
    roles = [build_role(uid, scp_role=True) for uid in storage]
    return contexts, roles


#: Contexts a C-GET association needs besides storage: the retrieve models, IMAGE-level C-FIND
#: (which instances are missing) and Verification.
def _get_query_contexts() -> list[PresentationContext]:
    return [
        build_context(GET_MODELS["study"], QUERY_SYNTAXES),
        build_context(GET_MODELS["patient"], QUERY_SYNTAXES),
        build_context(FIND_MODELS["study"], QUERY_SYNTAXES),
        build_context(Verification, QUERY_SYNTAXES),
    ]


MAX_CONTEXTS = 128


def per_syntax_contexts(
    sop_classes: Sequence[str],
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """A C-GET proposal for these storage classes: one context per (class, syntax), so the
    PACS sends each instance in the syntax it stores it in. At most 128 contexts: the caller
    splits the classes (:func:`series_get_plan`)."""
    contexts = _get_query_contexts()
    for uid in sop_classes:
        contexts += [build_context(uid, [syntax]) for syntax in TRANSFER_SYNTAXES]
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(sop_classes)} SOP classes need {len(contexts)} contexts: more than {MAX_CONTEXTS}")
    return contexts, [build_role(uid, scp_role=True) for uid in sop_classes]


def series_get_plan(sop_classes: Sequence[str]) -> list[list[str]]:
    """The SOP classes of a series in groups that each fit one C-GET association of
    :func:`per_syntax_contexts` (3 classes of 39 syntaxes and the 4 query contexts: 121)."""
    per_group = max(1, (MAX_CONTEXTS - len(_get_query_contexts())) // len(TRANSFER_SYNTAXES))
    ordered = sorted(dict.fromkeys(str(c) for c in sop_classes))
    return [ordered[i : i + per_group] for i in range(0, len(ordered), per_group)]


def receiver_contexts() -> list[PresentationContext]:
    """What the storage SCP accepts: verification and every storage class in every syntax."""
    return [build_context(Verification)] + [build_context(uid, TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES]
