"""Presentation contexts: which SOP classes and transfer syntaxes we propose and accept.

Refusing a storage SOP class or a compressed transfer syntax makes PACS sub-operations fail
silently for that modality, so the receiver accepts every storage class pynetdicom knows with
every transfer syntax pydicom knows. A C-GET association must propose the storage classes itself
and has room for 128 contexts in all, so C-GET proposes its 4 query contexts and pynetdicom's
120 most common storage classes (a series of a rarer class needs C-MOVE).
"""

from __future__ import annotations

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
    """What a C-GET requestor proposes (<= 128 contexts) and the SCP role for each storage class."""
    contexts = [
        build_context(GET_MODELS["study"], QUERY_SYNTAXES),
        build_context(GET_MODELS["patient"], QUERY_SYNTAXES),
        # IMAGE-level C-FIND (which instances are missing) goes over the same association
        build_context(FIND_MODELS["study"], QUERY_SYNTAXES),
        build_context(Verification, QUERY_SYNTAXES),
    ]
    storage = CGET_STORAGE_SOP_CLASSES[: 128 - len(contexts)]
    contexts += [build_context(uid, TRANSFER_SYNTAXES) for uid in storage]
    roles = [build_role(uid, scp_role=True) for uid in storage]
    return contexts, roles


def receiver_contexts() -> list[PresentationContext]:
    """What the storage SCP accepts: verification and every storage class in every syntax."""
    return [build_context(Verification)] + [build_context(uid, TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES]
