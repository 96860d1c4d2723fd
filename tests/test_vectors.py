"""Every file in the shared vectors gives exactly the result /work/shared/vectors/README.md states,
through the pure core (chain replay, encoding, signatures, did:key, DID syntax).

CIDs and DIDs are also recomputed with the independent encoder in tests/plcdata.py, so an
encoding bug in the core cannot hide behind a self-consistent round trip.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import base58
import libipld
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import utils as ec_utils

from plc.core import chain, encoding
from plc.core.didkey import K256, P256, decode_did_key, format_did_key, parse_rotation_key
from plc.core.didsyntax import is_valid_did, is_valid_plc_did
from plc.core.encoding import authority_keys, normalize_op
from plc.core.errors import OpError, Reason
from plc.core.signatures import (
    ORDER,
    SigDecodeError,
    SigningKey,
    decode_sig,
    encode_sig,
    first_verifying_key,
    is_low_s,
    verify_digest,
)

from conftest import VECTORS
from plcdata import NOW, load_audit_log, ref_cid, ref_dag_cbor, ref_did

GO = VECTORS / "go-didplc" / "testdata"
CLJ = VECTORS / "atproto-clj" / "test" / "atproto" / "identity" / "fixtures"
INTEROP = VECTORS / "atproto-interop-tests"
INVALIDATED = VECTORS / "did-method-plc" / "invalidated-op-log.txt"

BSKY_DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
BSKY_GENESIS_CID = "bafyreigp6shzy6dlcxuowwoxz7u5nemdrkad2my5zwzpwilcnhih7bw6zm"
BSKY_OP1_CID = "bafyreihmuvr3frdvd6vmdhucih277prdcfcezf67lasg5oekxoimnunjoq"

# ----------------------------------------------------------------------------- audit logs
# file -> expected final nullified flags (from the README's "expected" column, not from the file)
VALID_LOGS = {
    GO / "log_bskyapp.json": [False, False],
    GO / "log_bnewbold_robocracy.json": [False, False],
    GO / "log_legacy_dholms.json": [False] * 5,
    GO / "log_empty_rotation_keys.json": [False, False],
    GO / "log_duplicate_rotation_keys.json": [False],
    GO / "log_nullification.json": [False, True, False],
    GO / "log_nullification_at_exactly_72h.json": [False, False, True, False],
    GO / "log_tombstone.json": [False, False],
    CLJ / "audit-log-legacy.json": [False] * 8,
    CLJ / "audit-log-modern.json": [False] * 3,
    VECTORS / "shadow-did-plc-server" / "audit_log_example_update.json": [False, False],
}

# file -> (rejected op index, reason, status)
INVALID_LOGS = {
    "log_invalid_sig_b64_newline.json": (0, Reason.SIG_ENCODING, 500),
    "log_invalid_sig_b64_padding_chars.json": (0, Reason.SIG_PADDING, 400),
    "log_invalid_sig_b64_padding_bits.json": (0, Reason.SIG_ENCODING, 500),
    "log_invalid_sig_der.json": (0, Reason.SIG_INVALID, 400),
    "log_invalid_sig_k256_high_s.json": (0, Reason.SIG_HIGH_S, 400),
    "log_invalid_nullification_reused_key.json": (2, Reason.SIG_INVALID, 400),
    "log_invalid_update_nullified.json": (4, Reason.MISORDERED, 400),
    "log_invalid_update_tombstoned.json": (2, Reason.MISORDERED, 400),
}


def _ids(paths):
    return [p.name for p in paths]


def test_every_vector_file_is_covered(vectors_dir: Path):
    """The README lists 32 data files; each one is exercised by a test in this module."""
    files = sorted(p for p in vectors_dir.rglob("*") if p.is_file() and p.name != "README.md")
    assert len(files) == 32
    covered = set(VALID_LOGS) | {GO / n for n in INVALID_LOGS} | {
        CLJ / "data-legacy.json",
        CLJ / "data-modern.json",
        GO / "known_bad_cids.json",
        GO / "known_bad_dids.json",
        INVALIDATED,
        INTEROP / "crypto" / "signature-fixtures.json",
        INTEROP / "crypto" / "w3c_didkey_K256.json",
        INTEROP / "crypto" / "w3c_didkey_P256.json",
        INTEROP / "data-model" / "data-model-fixtures.json",
        INTEROP / "syntax" / "did_syntax_valid.txt",
        INTEROP / "syntax" / "did_syntax_invalid.txt",
        # rendering vectors: byte-level checks live in test_render.py; here the state they show
        VECTORS / "indigo" / "atproto" / "identity" / "testdata" / "did_plc_doc.json",
        VECTORS / "indigo" / "atproto" / "identity" / "testdata" / "did_plc_doc_legacy.json",
    }
    assert set(files) == covered


@pytest.mark.parametrize("path", list(VALID_LOGS), ids=_ids(VALID_LOGS))
def test_valid_log_replays_cleanly(path: Path):
    did, items, stored_flags = load_audit_log(path)
    expected_flags = VALID_LOGS[path]
    assert stored_flags == expected_flags  # the file agrees with the README for valid logs
    for op, _, cid in items:
        assert encoding.op_cid(op) == cid == ref_cid(op)
    assert encoding.did_for_genesis(items[0][0]) == ref_did(items[0][0]) == did

    log, rejected = chain.replay(did, items)

    assert rejected == []
    assert [e.cid for e in log.entries] == [cid for _, _, cid in items]
    assert [e.nullified for e in log.entries] == expected_flags
    assert [e.cid for e in log.live] == [cid for (_, _, cid), n in zip(items, expected_flags) if not n]


def test_valid_logs_details():
    """Per-file facts the README states: signer indexes, frozen and tombstoned DIDs."""
    # legacy genesis: op #1 is checked against the normalised pair [recoveryKey, signingKey]
    did, items, _ = load_audit_log(GO / "log_legacy_dholms.json")
    log, _ = chain.replay(did, items)
    genesis = items[0][0]
    assert log.entries[0].keys == (genesis["recoveryKey"], genesis["signingKey"])
    assert log.entries[1].signer in (0, 1)
    # empty rotation keys: the DID is frozen
    did, items, _ = load_audit_log(GO / "log_empty_rotation_keys.json")
    log, _ = chain.replay(did, items)
    assert log.head().keys == ()
    # duplicate rotation keys in genesis are kept as given
    did, items, _ = load_audit_log(GO / "log_duplicate_rotation_keys.json")
    log, _ = chain.replay(did, items)
    assert log.head().keys[0] == log.head().keys[1]
    # tombstone as last op: the head is the tombstone, nothing can follow it
    did, items, _ = load_audit_log(GO / "log_tombstone.json")
    log, _ = chain.replay(did, items)
    assert log.head().tombstone and log.head().keys == ()
    # simplest recovery: op #1 was signed by key index 1, the recovery by index 0
    did, items, _ = load_audit_log(GO / "log_nullification.json")
    log, _ = chain.replay(did, items)
    assert [e.signer for e in log.entries] == [-1, 1, 0]
    # the recovery at exactly 72 h: 259 200 000 ms after the op it discards
    did, items, _ = load_audit_log(GO / "log_nullification_at_exactly_72h.json")
    assert items[3][1] - items[2][1] == 72 * 3_600_000


@pytest.mark.parametrize("name", list(INVALID_LOGS))
def test_invalid_log_rejected_at_stated_op(name: str):
    index, reason, status = INVALID_LOGS[name]
    did, items, _ = load_audit_log(GO / name)
    for op, _, cid in items:  # every op's CID still matches
        assert encoding.op_cid(op) == cid == ref_cid(op)

    log, rejected = chain.replay(did, items)

    assert [(i, e.reason) for i, e in rejected] == [(index, reason)]
    err = rejected[0][1]
    assert err.status == status
    if status == 500:
        assert err.message == "Internal Server Error"
    elif reason != Reason.MISORDERED:
        assert err.message.startswith("Invalid signature on op: ")
    else:
        assert err.message == "Operations not correctly ordered"
    assert [e.cid for e in log.entries] == [cid for i, (_, _, cid) in enumerate(items) if i != index]


@pytest.mark.parametrize("name", [n for n in INVALID_LOGS if n.startswith("log_invalid_sig")])
def test_invalid_sig_logs_same_verdict_on_submit(name: str):
    """The single-op signature logs give the same reason and status when POSTed now."""
    _, reason, status = INVALID_LOGS[name]
    did, items, _ = load_audit_log(GO / name)
    with pytest.raises(OpError) as exc:
        chain.check_op(None, did, items[0][0], mode=chain.SUBMIT, created_at=NOW)
    assert (exc.value.reason, exc.value.status) == (reason, status)


def test_reused_key_nullification_leaves_op1_live():
    did, items, stored = load_audit_log(GO / "log_invalid_nullification_reused_key.json")
    assert stored[1] is True  # the file claims op #1 was nullified ...
    log, rejected = chain.replay(did, items)
    assert [i for i, _ in rejected] == [2]
    assert [e.nullified for e in log.entries] == [False, False]  # ... a correct replay keeps it
    assert log.head().cid == items[1][2]
    assert log.entries[1].signer == 1  # op #1 was signed by key index 1, the same key as op #2


def test_update_on_nullified_op_rejected():
    did, items, stored = load_audit_log(GO / "log_invalid_update_nullified.json")
    log, rejected = chain.replay(did, items)
    assert [(i, e.reason) for i, e in rejected] == [(4, Reason.MISORDERED)]
    assert [e.nullified for e in log.entries] == [False, False, True, False]
    assert log.entries[3].signer == 0  # op #3 (key 0) nullified op #2
    assert items[4][1] == items[3][1]  # same createdAt as the nullifier


def test_update_on_tombstone_rejected():
    did, items, _ = load_audit_log(GO / "log_invalid_update_tombstoned.json")
    log, rejected = chain.replay(did, items)
    assert [(i, e.reason) for i, e in rejected] == [(2, Reason.MISORDERED)]
    assert log.head().tombstone


def test_der_vector_is_a_64_byte_der_blob_that_verifies_only_as_der():
    """README: read as DER the signature verifies (low S); read as compact r||s it does not."""
    did, items, _ = load_audit_log(GO / "log_invalid_sig_der.json")
    op = items[0][0]
    raw = decode_sig(op["sig"])
    assert len(raw) == 64 and raw[0] == 0x30 and raw[1] == 62  # DER SEQUENCE of 62 bytes
    digest = hashlib.sha256(encoding.unsigned_cbor(op)).digest()
    keys = authority_keys(op)
    assert first_verifying_key(keys, digest, raw) == -1
    r, s = ec_utils.decode_dss_signature(raw)
    compact = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert first_verifying_key(keys, digest, compact) == 0
    assert encoding.did_for_genesis(op) == did


@pytest.mark.parametrize("kind", ["legacy", "modern"])
def test_data_documents_equal_replayed_state(kind: str):
    did, items, _ = load_audit_log(CLJ / f"audit-log-{kind}.json")
    data = json.loads((CLJ / f"data-{kind}.json").read_text())
    log, rejected = chain.replay(did, items)
    assert rejected == []
    head = normalize_op(log.head().op)
    assert data == {
        "did": did,
        "verificationMethods": head["verificationMethods"],
        "rotationKeys": head["rotationKeys"],
        "alsoKnownAs": head["alsoKnownAs"],
        "services": head["services"],
    }


def test_indigo_documents_describe_state_after_op1_of_modern_log():
    did, items, _ = load_audit_log(CLJ / "audit-log-modern.json")
    log, _ = chain.replay(did, items[:2])
    head = log.head().op
    doc = json.loads((VECTORS / "indigo/atproto/identity/testdata/did_plc_doc.json").read_text())
    legacy = json.loads((VECTORS / "indigo/atproto/identity/testdata/did_plc_doc_legacy.json").read_text())
    for d in (doc, legacy):
        assert d["id"] == did
        assert d["alsoKnownAs"] == head["alsoKnownAs"]
        assert [s["serviceEndpoint"] for s in d["service"]] == [head["services"]["atproto_pds"]["endpoint"]]
    assert [vm["publicKeyMultibase"] for vm in doc["verificationMethod"]] == [
        head["verificationMethods"]["atproto"][len("did:key:") :]
    ]


# ----------------------------------------------------------------------------- interop crypto
def _b64std(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


SIG_FIXTURES = json.loads((INTEROP / "crypto" / "signature-fixtures.json").read_text())


@pytest.mark.parametrize("case", SIG_FIXTURES, ids=[c["comment"][:40] for c in SIG_FIXTURES])
def test_signature_fixture(case: dict):
    curve = {"ES256": P256, "ES256K": K256}[case["algorithm"]]
    # did:key and multibase forms name the same key
    compressed = base58.b58decode(case["publicKeyMultibase"][1:])
    assert case["publicKeyMultibase"][0] == "z" and len(compressed) == 33
    assert format_did_key(curve, compressed) == case["publicKeyDid"]
    assert decode_did_key(case["publicKeyDid"]) == (curve, compressed)

    key = parse_rotation_key(case["publicKeyDid"])
    digest = hashlib.sha256(_b64std(case["messageBase64"])).digest()
    raw = _b64std(case["signatureBase64"])
    if re.search(r"[+/]", case["signatureBase64"]):
        # the fixture is standard base64; as a PLC `sig` that text is refused outright
        with pytest.raises(SigDecodeError) as exc:
            decode_sig(case["signatureBase64"])
        assert (exc.value.reason, exc.value.status) == (Reason.SIG_ENCODING, 500)
    tags = set(case["tags"])
    if "der-encoded" in tags:
        assert len(raw) != 64
        with pytest.raises(SigDecodeError) as exc:
            decode_sig(encode_sig(raw))
        assert (exc.value.reason, exc.value.status) == (Reason.SIG_LENGTH, 400)
        r, s = ec_utils.decode_dss_signature(raw)  # it is a real DER signature of that message
        assert verify_digest(key, digest, r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        assert case["validSignature"] is False
        return
    sig = decode_sig(encode_sig(raw))
    assert sig == raw
    assert verify_digest(key, digest, sig) is case["validSignature"]
    if "high-s" in tags:
        assert not is_low_s(curve, sig)
        s = int.from_bytes(sig[32:], "big")
        low = sig[:32] + (ORDER[curve] - s).to_bytes(32, "big")
        assert verify_digest(key, digest, low)  # mathematically valid, refused only for high S
    else:
        assert is_low_s(curve, sig)


def test_signature_fixture_counts():
    assert len(SIG_FIXTURES) == 6
    assert sum(c["validSignature"] for c in SIG_FIXTURES) == 2


@pytest.mark.parametrize(
    "case",
    json.loads((INTEROP / "crypto" / "w3c_didkey_K256.json").read_text()),
    ids=lambda c: c["publicDidKey"][-8:],
)
def test_w3c_didkey_k256(case: dict):
    k = SigningKey(K256, bytes.fromhex(case["privateKeyBytesHex"]))
    assert k.did_key == case["publicDidKey"]
    assert parse_rotation_key(k.did_key).curve == K256


def test_w3c_didkey_p256():
    cases = json.loads((INTEROP / "crypto" / "w3c_didkey_P256.json").read_text())
    assert len(cases) == 1
    for case in cases:
        k = SigningKey(P256, base58.b58decode(case["privateKeyBytesBase58"]))
        assert k.did_key == case["publicDidKey"]
        assert parse_rotation_key(k.did_key).curve == P256


# ----------------------------------------------------------------------------- data model
def _ipld(value):
    """JSON data-model form → Python value libipld encodes: $link → CID bytes, $bytes → bytes."""
    if isinstance(value, dict):
        if set(value) == {"$link"}:
            base, cid_bytes = libipld.decode_multibase(value["$link"])
            assert base == "b"
            return cid_bytes
        if set(value) == {"$bytes"}:
            return _b64std(value["$bytes"])
        return {k: _ipld(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ipld(v) for v in value]
    return value


DATA_MODEL = json.loads((INTEROP / "data-model" / "data-model-fixtures.json").read_text())


@pytest.mark.parametrize("case", DATA_MODEL, ids=[c["cid"][-8:] for c in DATA_MODEL])
def test_data_model_fixture(case: dict):
    expected = _b64std(case["cbor_base64"])
    value = _ipld(case["json"])
    cbor = encoding.dag_cbor(value)
    assert cbor == expected
    assert encoding.cid_for_cbor(cbor) == case["cid"]
    # reversed key order gives the same bytes
    assert encoding.dag_cbor(_reverse_keys(value)) == expected
    # the independent encoder agrees on the plain-JSON fixture (no links or bytes)
    if "$link" not in json.dumps(case["json"]) and "$bytes" not in json.dumps(case["json"]):
        assert ref_dag_cbor(case["json"]) == expected
    assert libipld.decode_dag_cbor(expected) == value


def _reverse_keys(v):
    if isinstance(v, dict):
        return {k: _reverse_keys(v[k]) for k in reversed(list(v))}
    if isinstance(v, list):
        return [_reverse_keys(x) for x in v]
    return v


# ----------------------------------------------------------------------------- DID syntax
def _syntax_lines(name: str) -> list[str]:
    text = (INTEROP / "syntax" / name).read_text(encoding="utf-8")
    return [ln for ln in text.split("\n") if ln and not ln.startswith("#")]


def test_did_syntax_valid():
    lines = _syntax_lines("did_syntax_valid.txt")
    assert len(lines) == 24
    assert [ln for ln in lines if not is_valid_did(ln)] == []
    assert [ln for ln in lines if is_valid_plc_did(ln)] == ["did:plc:7iza6de2dwap2sbkpav7c6c6"]


def test_did_syntax_invalid():
    lines = _syntax_lines("did_syntax_invalid.txt")
    assert len(lines) == 18
    assert [ln for ln in lines if is_valid_did(ln)] == []
    assert not any(is_valid_plc_did(ln) for ln in lines)


def test_plc_did_syntax_edges():
    assert is_valid_plc_did(BSKY_DID)
    assert not is_valid_plc_did(BSKY_DID + "a")  # identifier longer than 24 (the 2023 exploit)
    assert not is_valid_plc_did(BSKY_DID[:-1])
    assert not is_valid_plc_did(BSKY_DID.upper().replace("DID:PLC:", "did:plc:"))
    assert not is_valid_plc_did("did:plc:z72i7hdynmk6r22z27h6tvu1")  # 1 is not base32
    assert not is_valid_plc_did(BSKY_DID + "\n")
    assert not is_valid_did("did:method:val\n")
    assert not is_valid_did("did:method:vål")
    assert is_valid_did("did:m:" + "v" * (2048 - 6)) and not is_valid_did("did:m:" + "v" * (2049 - 6))


# ----------------------------------------------------------------------------- known-bad lists
def test_known_bad_cids():
    cids = json.loads((GO / "known_bad_cids.json").read_text())
    assert len(cids) == 6027 and len(set(cids)) == 6027
    for c in cids:
        assert re.fullmatch(r"bafyrei[a-z2-7]{52}", c), c
    for c in cids[:: max(1, len(cids) // 200)]:  # parse a sample fully
        cid = libipld.decode_cid(c)
        assert (cid["version"], cid["codec"], cid["hash"]["code"], cid["hash"]["size"]) == (1, 0x71, 0x12, 32)
        assert encoding.canonical_cid(c) == c
    # the DER log's op is listed; none of the ops of the expected-valid logs are
    did, items, _ = load_audit_log(GO / "log_invalid_sig_der.json")
    assert items[0][2] in set(cids)
    valid_cids = {cid for p in VALID_LOGS for _, _, cid in load_audit_log(p)[1]}
    assert valid_cids.isdisjoint(cids)


def test_known_bad_dids():
    dids = json.loads((GO / "known_bad_dids.json").read_text())
    assert len(dids) == 6024 and len(set(dids)) == 6024
    assert [d for d in dids if not is_valid_plc_did(d)] == []
    did, _, _ = load_audit_log(GO / "log_invalid_sig_der.json")
    assert did in set(dids)
    valid_dids = {load_audit_log(p)[0] for p in VALID_LOGS}
    assert valid_dids.isdisjoint(dids)


# ----------------------------------------------------------------------------- invalidated-op-log.txt
def _invalidated_entries() -> list[str]:
    text = INVALIDATED.read_text(encoding="utf-8")
    return [ln[2:] for ln in text.split("\n") if ln.startswith("- ")]


INV = _invalidated_entries()
INV_OPS = {n: json.loads(t) for n, t in enumerate(INV, 1) if n != 3}  # entry 3 is truncated upstream

# entry number (1-based, in file order) -> expected CID (pinned; cross-checked below)
INV_CIDS = {
    1: "bafyreidaxmtdx6pb3up6tznwdbdse53uytfl7laql4cdlig22zhktkhfjy",
    2: "bafyreidgciciiy7gc44mzzvhisqycd3qyhsh2yhpf4vbvwxmk4ru4ijvaa",
    4: "bafyreia35b57toascj3hoa7relvgvs7tr53qssorjvoopwv6rlt6ov3xm4",
    5: "bafyreig7homaomtuielvzrueyugpco7s77yun6qdfxstp65tgvzt7xim7a",
    6: "bafyreieq3xqxta2axi6gtcy2mdyoiw7nxlcu7gfhf6iao3gt3nyeo7iloe",
    7: "bafyreiamwc4jjhhnwga5sxjtmdx3ejzw6uwdeswqju6ndiizrlbxd5ye2a",
    8: "bafyreiehfbsnyn6td7uldlk2koexx6no3liqvlgraqpnq4gnsqh5x2fahu",
    9: "bafyreibkmebojf2lle6n6cpg3urrtvp2lmygpafjbcrxaq2lyshhciclde",
    10: "bafyreif22gbjnv6yfs6i65y2m6rfyi23ub6cb7m5wxgyowlpo55cfx7r6e",
    11: "bafyreigzg4n5kucnexzyz46f6j5ioabobev47kvxyjdez2zwxtc66fz22u",
    12: "bafyreib4tvovk7mapbxwarbl54n3qrre5pbkxdd4or6sjx7apph3qfb7ki",
    13: "bafyreid7djc2gntkw55owvtcxrx7dtvida2canrppiklip674t2eyhwp5a",
    14: "bafyreifnwnrtobqfhza7yp5u7nf76gqzwdfx6zia63pqn22wnfxs6geguu",
    15: "bafyreihdlzisofq7xmppjngikstdjzmnk6lvuhcteuaimkk2flc4wp3hyq",
    16: "bafyreifnwnrtobqfhza7yp5u7nf76gqzwdfx6zia63pqn22wnfxs6geguu",
    17: BSKY_OP1_CID,
    18: "bafyreifddth26c2ilxqxxye56fnsmv252uhpkkpwvfyvugmifucgrffase",
    19: BSKY_GENESIS_CID,
    20: BSKY_GENESIS_CID,
    21: BSKY_OP1_CID,
    22: "bafyreidaxmtdx6pb3up6tznwdbdse53uytfl7laql4cdlig22zhktkhfjy",
}
INV_GENESIS = {4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 19, 20}
INV_VERIFY_STRICTLY = {4, 9, 12, 14, 15, 16, 19, 20}  # incl. 15, the "vanity" op (its sig is fine)
INV_HIGH_S = {5, 6, 7, 8, 10, 11}  # P-256 legacy creates
INV_EXTRA_FIELD = {15}


def test_invalidated_log_parse():
    assert len(INV) == 22
    assert len(INV_OPS) == 21
    # the third entry is truncated upstream: a clear JSON error, from both parsers we use
    with pytest.raises(ValueError, match="Expecting ',' delimiter"):
        json.loads(INV[2])
    with pytest.raises(orjson.JSONDecodeError) as exc:
        orjson.loads(INV[2])
    assert isinstance(exc.value, ValueError) and str(exc.value)
    # its prev can still be read: it continues entry 2's chain
    assert re.search(r'"prev":"(bafyrei[a-z2-7]+)"', INV[2]).group(1) == INV_CIDS[2]


def test_invalidated_log_cids_are_stable():
    assert set(INV_OPS) == set(INV_CIDS)
    for n, op in INV_OPS.items():
        assert encoding.op_cid(op) == INV_CIDS[n] == ref_cid(op)
        assert encoding.op_cid(_reverse_keys(op)) == INV_CIDS[n]
        assert encoding.op_cid(orjson.loads(INV[n - 1])) == INV_CIDS[n]
    # the chains inside the file link up through the computed CIDs
    assert INV_OPS[1]["prev"] == INV_CIDS[17] == BSKY_OP1_CID
    assert INV_OPS[2]["prev"] == INV_CIDS[1]
    assert INV_OPS[13]["prev"] == INV_CIDS[18]
    assert INV_OPS[18]["prev"] == INV_CIDS[14]
    assert INV_OPS[17]["prev"] == INV_CIDS[19]
    # two entries are byte-identical to bsky.app's real ops #0 and #1
    _, bsky, _ = load_audit_log(GO / "log_bskyapp.json")
    assert [bsky[0][0], bsky[1][0]] == [INV_OPS[19], INV_OPS[17]]
    assert encoding.did_for_genesis(INV_OPS[19]) == BSKY_DID


def test_invalidated_log_genesis_signatures():
    genesis = {n for n, op in INV_OPS.items() if op["prev"] is None}
    assert genesis == INV_GENESIS and len(genesis) == 14
    verify, high_s = set(), set()
    for n in genesis:
        op = INV_OPS[n]
        keys = authority_keys(op)
        digest = hashlib.sha256(encoding.unsigned_cbor(op)).digest()
        sig = decode_sig(op["sig"])
        if first_verifying_key(keys, digest, sig) >= 0:
            verify.add(n)
            continue
        pk = parse_rotation_key(keys[0])
        assert pk.curve == P256 and not is_low_s(P256, sig)
        flipped = sig[:32] + (ORDER[P256] - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
        assert first_verifying_key(keys, digest, flipped) >= 0  # valid only if high S were tolerated
        high_s.add(n)
    assert verify == INV_VERIFY_STRICTLY and len(verify) == 8
    assert high_s == INV_HIGH_S and len(high_s) == 6
    legacy = {n for n, op in INV_OPS.items() if op["type"] == "create"}
    assert len(legacy) == 9 and legacy & high_s == high_s
    assert all(parse_rotation_key(INV_OPS[n]["signingKey"]).curve == P256 for n in legacy)


def test_invalidated_log_extra_field_is_invalid_shape():
    op = INV_OPS[15]
    assert "vanity" in op and op["rotationKeys"][0] == op["rotationKeys"][1]
    for mode in (chain.REPLAY, chain.SUBMIT):
        with pytest.raises(OpError) as exc:
            chain.check_op(None, encoding.did_for_genesis(op), op, mode=mode, created_at=NOW)
        assert exc.value.reason == Reason.INVALID_SHAPE
        assert exc.value.message.startswith('Not a valid operation: {"sig":"-5Jibdx0')


def _long_did(op: dict) -> str:
    """A DID of the kind the operators removed: identifier longer than 24 characters, here the
    op's own hash DID with extra characters (the 'flexible DID length' exploit)."""
    return encoding.did_for_genesis(op) + "vanity"


def test_invalidated_ops_are_all_rejected_under_long_dids():
    """The operators removed these ops from DIDs whose identifier was longer than 24 chars. A
    strict replay accepts none of them there: the verifying ones fail the genesis hash check
    (the computed DID is only a prefix of the DID they were stored under)."""
    expected = {}
    for n in INV_OPS:
        if n in INV_EXTRA_FIELD:
            expected[n] = Reason.INVALID_SHAPE
        elif n in INV_HIGH_S:
            expected[n] = Reason.SIG_HIGH_S
        else:  # verifying genesis ops, and updates whose own keys sign them, hit the hash check
            expected[n] = Reason.GENESIS_HASH
    for n, op in INV_OPS.items():
        did = _long_did(op)
        assert not is_valid_plc_did(did)
        log, rejected = chain.replay(did, [(op, 1_685_000_000_000, INV_CIDS[n])])
        assert log.entries == []
        assert [(i, e.reason) for i, e in rejected] == [(0, expected[n])], n
        if expected[n] == Reason.GENESIS_HASH:
            msg = rejected[0][1].message
            computed = encoding.did_for_genesis(op)
            assert msg == f"Hash of genesis operation does not match DID identifier: {computed}"
            assert did.startswith(msg.rsplit(" ", 1)[1])
    assert sum(r == Reason.GENESIS_HASH for r in expected.values()) == 14


def test_invalidated_chains_replayed_in_order_under_long_dids():
    """Each removed chain, replayed in order under the long DID of its first op, keeps nothing."""
    chains = [[19, 17, 1, 2], [14, 18, 13], [20, 21, 22]]
    for ns in chains:
        did = _long_did(INV_OPS[ns[0]])
        items = [(INV_OPS[n], 1_685_000_000_000 + i, INV_CIDS[n]) for i, n in enumerate(ns)]
        log, rejected = chain.replay(did, items)
        assert log.entries == [] and [i for i, _ in rejected] == list(range(len(ns)))


def test_invalidated_ops_under_their_own_hash_dids():
    """Under the DID its bytes hash to, each verifying genesis op is acceptable (the ops were
    fine; the DIDs were not); every non-genesis op, having no history there, is a genesis with a
    non-null prev."""
    for n, op in INV_OPS.items():
        did = encoding.did_for_genesis(op)
        log, rejected = chain.replay(did, [(op, 1_685_000_000_000, INV_CIDS[n])])
        if n in INV_VERIFY_STRICTLY - INV_EXTRA_FIELD:
            assert rejected == [] and log.head().cid == INV_CIDS[n]
        elif n in INV_HIGH_S:
            assert [e.reason for _, e in rejected] == [Reason.SIG_HIGH_S]
        elif n in INV_EXTRA_FIELD:
            assert [e.reason for _, e in rejected] == [Reason.INVALID_SHAPE]
        else:
            assert op["prev"] is not None
            assert [e.message for _, e in rejected] == [
                "Improperly formatted operation, expected null prev on create: [object Object]"
            ]
