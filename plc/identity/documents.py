"""What identity resolution reads from a DID document (pure: no I/O).

- ``handles_in``/``first_handle``/``claims_handle``: the `at://<handle>` entries of
  `alsoKnownAs` (atproto: the first one that is a valid handle is the account's handle).
- ``pds_endpoint``: the `#atproto_pds` service (type `AtprotoPersonalDataServer`) endpoint.
- ``signing_key``: the `#atproto` verification method as a did:key (`Multikey` with a
  `publicKeyMultibase`).
- ``document_problem``: why a fetched document cannot stand for a DID (not an object, `id`
  differs).
- ``mini_doc``: `{did, handle, pds, signing_key}`.
"""

from __future__ import annotations

from typing import Any

from .handles import INVALID_HANDLE, handle_syntax_problem, normalize_handle

AT_PREFIX = "at://"
PDS_SERVICE = "atproto_pds"
PDS_TYPE = "AtprotoPersonalDataServer"
SIGNING_METHOD = "atproto"


def handles_in(doc: dict[str, Any]) -> list[str]:
    """The normalised handles of the document's `at://` alsoKnownAs entries, in order (entries
    that are not valid handles are skipped)."""
    aka = doc.get("alsoKnownAs")
    if not isinstance(aka, list):
        return []
    out = []
    for entry in aka:
        if isinstance(entry, str) and entry.startswith(AT_PREFIX):
            handle = normalize_handle(entry[len(AT_PREFIX):])
            if handle_syntax_problem(handle) is None:
                out.append(handle)
    return out


def first_handle(doc: dict[str, Any]) -> str | None:
    """The handle the document claims (its first valid `at://` entry), or None."""
    found = handles_in(doc)
    return found[0] if found else None


def claims_handle(doc: dict[str, Any], handle: str) -> bool:
    """True if the document's alsoKnownAs holds `at://<handle>` (case-insensitively)."""
    return normalize_handle(handle) in handles_in(doc)


def _fragment_matches(entry_id: Any, did: str, name: str) -> bool:
    return isinstance(entry_id, str) and (entry_id == f"#{name}" or entry_id == f"{did}#{name}")


def pds_endpoint(doc: dict[str, Any]) -> str | None:
    """The `#atproto_pds` service endpoint (a string), or None."""
    did = doc.get("id")
    services = doc.get("service")
    if not isinstance(services, list) or not isinstance(did, str):
        return None
    for s in services:
        if isinstance(s, dict) and _fragment_matches(s.get("id"), did, PDS_SERVICE):
            endpoint = s.get("serviceEndpoint")
            if s.get("type") == PDS_TYPE and isinstance(endpoint, str):
                return endpoint
            return None
    return None


def signing_key(doc: dict[str, Any]) -> str | None:
    """The `#atproto` verification method's key as a did:key (Multikey only), or None."""
    did = doc.get("id")
    methods = doc.get("verificationMethod")
    if not isinstance(methods, list) or not isinstance(did, str):
        return None
    for m in methods:
        if isinstance(m, dict) and _fragment_matches(m.get("id"), did, SIGNING_METHOD):
            multibase = m.get("publicKeyMultibase")
            if m.get("type") == "Multikey" and isinstance(multibase, str) and multibase.startswith("z"):
                return "did:key:" + multibase
            return None
    return None


def document_problem(did: str, doc: Any) -> str | None:
    """Why ``doc`` is not an acceptable DID document for ``did``; None if it is."""
    if not isinstance(doc, dict):
        return "DID document is not a JSON object"
    if doc.get("id") != did:
        return "DID document id does not match the DID"
    return None


def mini_doc(did: str, handle: str | None, doc: dict[str, Any]) -> dict[str, Any]:
    """The compact identity: `{did, handle, pds, signing_key}` (handle ``handle.invalid`` when
    unverified; pds / signing_key null when the document has none)."""
    return {
        "did": did,
        "handle": handle if handle is not None else INVALID_HANDLE,
        "pds": pds_endpoint(doc),
        "signing_key": signing_key(doc),
    }
