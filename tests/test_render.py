"""Byte-exact rendering of the read routes, export lines and stream messages (plc/core/render.py).

Expected values come from the shared vectors (real plc.directory responses) and from the literal
examples of spec §1.3, §1.5, §1.6 and §2; the rest are hand-written expected bytes for the key
order (§1.9) and JSON escaping (§1.1) edge cases of spec §7 items 21, 33 and 34.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import base58
import coincurve
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plc.core import chain, jsonfmt, render
from plc.core.encoding import did_for_genesis, unsigned_cbor
from plc.core.signatures import SigningKey

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"
CLJ = VECTORS / "atproto-clj" / "test" / "atproto" / "identity" / "fixtures"
GO = VECTORS / "go-didplc" / "testdata"

BSKY_DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
BSKY_CID = "bafyreigp6shzy6dlcxuowwoxz7u5nemdrkad2my5zwzpwilcnhih7bw6zm"
# spec §1.3 /log/last example (the signature the spec elides is the one in log_bskyapp.json)
BSKY_GENESIS = (
    b'{"sig":"9NuYV7AqwHVTc0YuWzNV3CJafsSZWH7qCxHRUIP2xWlB-YexXC1OaYAnUayiCXLVzRQ8WBXIqF-SvZdNalwcjA",'
    b'"prev":null,"type":"plc_operation","services":{"atproto_pds":{"type":"AtprotoPersonalDataServer",'
    b'"endpoint":"https://bsky.social"}},"alsoKnownAs":["at://bluesky-team.bsky.social"],'
    b'"rotationKeys":["did:key:zQ3shhCGUqDKjStzuDxPkTxN6ujddP4RkEKJJouJGRRkaLGbg",'
    b'"did:key:zQ3shpKnbdPx3g3CmPf5cRVTPe1HtSwVn5ish3wSnDPQCbLJK"],'
    b'"verificationMethods":{"atproto":"did:key:zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"}}'
)
BSKY_CREATED_MS = 1681275237057  # 2023-04-12T04:53:57.057Z

LEGACY_DID = "did:plc:yk4dd2qkboz2yv6tpubpc6co"
# spec §1.3 /data example and §2 DID document example (legacy genesis of LEGACY_DID)
LEGACY_DATA = (
    b'{"did":"did:plc:yk4dd2qkboz2yv6tpubpc6co","verificationMethods":{"atproto":'
    b'"did:key:zQ3shP5TBe1sQfSttXty15FAEHV1DZgcxRZNxvEWnPfLFwLxJ"},"rotationKeys":'
    b'["did:key:zQ3shhCGUqDKjStzuDxPkTxN6ujddP4RkEKJJouJGRRkaLGbg",'
    b'"did:key:zQ3shP5TBe1sQfSttXty15FAEHV1DZgcxRZNxvEWnPfLFwLxJ"],'
    b'"alsoKnownAs":["at://dan.bsky.social"],"services":{"atproto_pds":{"type":"AtprotoPersonalDataServer",'
    b'"endpoint":"https://bsky.social"}}}'
)
LEGACY_DOC = (
    b'{"@context":["https://www.w3.org/ns/did/v1","https://w3id.org/security/multikey/v1",'
    b'"https://w3id.org/security/suites/secp256k1-2019/v1"],"id":"did:plc:yk4dd2qkboz2yv6tpubpc6co",'
    b'"alsoKnownAs":["at://dan.bsky.social"],'
    b'"verificationMethod":[{"id":"did:plc:yk4dd2qkboz2yv6tpubpc6co#atproto",'
    b'"type":"Multikey","controller":"did:plc:yk4dd2qkboz2yv6tpubpc6co",'
    b'"publicKeyMultibase":"zQ3shP5TBe1sQfSttXty15FAEHV1DZgcxRZNxvEWnPfLFwLxJ"}],'
    b'"service":[{"id":"#atproto_pds","type":"AtprotoPersonalDataServer",'
    b'"serviceEndpoint":"https://bsky.social"}]}'
)
CTX2 = b'"@context":["https://www.w3.org/ns/did/v1","https://w3id.org/security/multikey/v1"'
ECDSA_CTX = "https://w3id.org/security/suites/ecdsa-2019/v1"
K256_CTX = "https://w3id.org/security/suites/secp256k1-2019/v1"


# ----------------------------------------------------------------------------- helpers
def load(path: Path) -> list[dict]:
    return json.loads(path.read_bytes())


def replay_audit(entries: list[dict]) -> chain.DidLog:
    """Replay audit-log entries with the chain engine; every op must be accepted."""
    items = [(e["operation"], jsonfmt.parse_ms(e["createdAt"]), e["cid"]) for e in entries]
    log, rejected = chain.replay(entries[0]["did"], items)
    assert rejected == []
    return log


def replay_file(path: Path) -> chain.DidLog:
    return replay_audit(load(path))


def pairs(data: bytes):
    """Parsed JSON with every object as a list of (key, value): compares key order too."""
    return json.loads(data, object_pairs_hook=list)


def shuffled(value):
    """The same JSON value with every object's keys in reversed insertion order."""
    if isinstance(value, dict):
        return {k: shuffled(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [shuffled(v) for v in value]
    return value


def signed_genesis(verification_methods: dict, services: dict, aka: list[str]) -> tuple[str, dict]:
    """A real signed plc_operation genesis (k256 rotation key), and its DID."""
    key = SigningKey.from_seed("k256", b"render-tests")
    op = {
        "type": "plc_operation",
        "rotationKeys": [key.did_key],
        "verificationMethods": verification_methods,
        "alsoKnownAs": aka,
        "services": services,
        "prev": None,
    }
    op["sig"] = key.sign(unsigned_cbor(op))
    return did_for_genesis(op), op


def accepted_entries(did: str, op: dict) -> list[chain.OpEntry]:
    """Run the op through the chain engine (replay mode) and return the DID's entries."""
    log, rejected = chain.replay(did, [(op, 1_700_000_000_000, None)])
    assert rejected == []
    return log.entries


def ed25519_did_key() -> str:
    return "did:key:z" + base58.b58encode(b"\xed\x01" + bytes(range(32))).decode()


def k256_did_key_off_curve() -> str:
    """A well-formed k256 did:key whose x coordinate is not on the curve."""
    for x in range(1, 1000):
        point = b"\x02" + x.to_bytes(32, "big")
        try:
            coincurve.PublicKey(point)
        except ValueError:
            return "did:key:z" + base58.b58encode(b"\xe7\x01" + point).decode()
    raise AssertionError("no off-curve x found")


K256_A = SigningKey.from_seed("k256", b"a").did_key
K256_B = SigningKey.from_seed("k256", b"b").did_key
P256_A = SigningKey.from_seed("p256", b"a").did_key
P256_B = SigningKey.from_seed("p256", b"b").did_key


# ----------------------------------------------------------------------------- real responses
@pytest.mark.parametrize("kind", ["legacy", "modern"])
def test_data_equals_fixture_after_replaying_audit_log(kind):
    log = replay_file(CLJ / f"audit-log-{kind}.json")
    expected = (CLJ / f"data-{kind}.json").read_bytes()
    body = render.data_json(log.did, render.latest_entry(log.entries).op)
    assert orjson.loads(body) == json.loads(expected)
    assert body == expected  # the fixture is the raw plc.directory response


@pytest.mark.parametrize("kind", ["legacy", "modern"])
def test_audit_log_equals_fixture_byte_for_byte(kind):
    path = CLJ / f"audit-log-{kind}.json"
    log = replay_file(path)
    assert render.audit_json_from_entries(log.did, log.entries) == path.read_bytes()
    rows = render.rows_from_entries(log.did, log.entries)
    assert render.audit_json(rows) == path.read_bytes()


def test_did_document_equals_indigo_fixture_after_op_1():
    log = replay_audit(load(CLJ / "audit-log-modern.json")[:2])
    doc = render.did_document_json(log.did, log.head().op)
    expected = (VECTORS / "indigo" / "atproto" / "identity" / "testdata" / "did_plc_doc.json").read_bytes()
    assert orjson.loads(doc) == json.loads(expected)
    assert pairs(doc) == pairs(expected)  # same key order as well


@pytest.mark.parametrize(
    "name",
    [
        "log_bskyapp",
        "log_bnewbold_robocracy",
        "log_legacy_dholms",
        "log_tombstone",
        "log_empty_rotation_keys",
        "log_duplicate_rotation_keys",
        "log_nullification_at_exactly_72h",
    ],
)
def test_audit_log_reproduces_upstream_key_order(name):
    """These logs hold ops as plc.directory served them: same values and key order, from
    ops whose keys were shuffled first."""
    path = GO / f"{name}.json"
    rows = []
    for e in load(path):
        created_at = jsonfmt.parse_ms(e["createdAt"])
        rows.append(render.OpRow(e["did"], shuffled(e["operation"]), e["cid"], created_at, e["nullified"]))
    assert pairs(render.audit_json(rows)) == pairs(path.read_bytes())


# ----------------------------------------------------------------------------- spec literals
def test_log_last_is_the_spec_example_whatever_the_input_key_order():
    op = load(GO / "log_bskyapp.json")[0]["operation"]
    assert render.log_last_json(op) == BSKY_GENESIS
    assert render.log_last_json(shuffled(op)) == BSKY_GENESIS
    assert render.op_json(shuffled(op)) == BSKY_GENESIS


def test_legacy_genesis_data_and_document_are_the_spec_examples():
    op = load(GO / "log_legacy_dholms.json")[0]["operation"]
    assert op["type"] == "create"
    assert render.data_json(LEGACY_DID, op) == LEGACY_DATA
    assert render.did_document_json(LEGACY_DID, op) == LEGACY_DOC
    assert render.data_json(LEGACY_DID, shuffled(op)) == LEGACY_DATA
    assert render.did_document_json(LEGACY_DID, shuffled(op)) == LEGACY_DOC


def test_legacy_create_stays_raw_in_log_audit_and_exports():
    path = GO / "log_legacy_dholms.json"
    log = replay_file(path)
    genesis = log.entries[0]
    raw = (
        b'{"sig":"7QTzqO1BcL3eDzP4P_YBxMmv5U4brHzAItkM9w5o8gZA7ElZkrVYEwsfQCfk5EoWLk58Z1y6fyNP9x1pthJnlw",'
        b'"prev":null,"type":"create","handle":"dan.bsky.social","service":"https://bsky.social",'
        b'"signingKey":"did:key:zQ3shP5TBe1sQfSttXty15FAEHV1DZgcxRZNxvEWnPfLFwLxJ",'
        b'"recoveryKey":"did:key:zQ3shhCGUqDKjStzuDxPkTxN6ujddP4RkEKJJouJGRRkaLGbg"}'
    )
    assert render.op_json(shuffled(genesis.op)) == raw
    assert render.log_json_from_entries(log.entries).startswith(b"[" + raw + b",")
    assert render.audit_json_from_entries(log.did, log.entries).startswith(
        b'[{"did":"did:plc:yk4dd2qkboz2yv6tpubpc6co","operation":' + raw + b',"cid":'
    )
    line = render.export_line_legacy(log.did, genesis.op, genesis.cid, genesis.created_at, False)
    assert b'"operation":' + raw + b',"nullified":false}' in line
    assert b'"operation":' + raw + b',"type":"sequenced_op"}' in render.export_line_sequenced(
        log.did, genesis.op, genesis.cid, genesis.created_at, 1
    )


def test_audit_entry_key_order():
    op = load(GO / "log_bskyapp.json")[0]["operation"]
    expected = (
        b'{"did":"' + BSKY_DID.encode() + b'","operation":' + BSKY_GENESIS + b',"cid":"' + BSKY_CID.encode()
        + b'","nullified":false,"createdAt":"2023-04-12T04:53:57.057Z"}'
    )
    assert render.audit_entry_json(BSKY_DID, shuffled(op), BSKY_CID, BSKY_CREATED_MS, False) == expected
    assert render.audit_json([(BSKY_DID, op, BSKY_CID, BSKY_CREATED_MS, False)]) == b"[" + expected + b"]"


def test_export_line_key_orders():
    op = shuffled(load(GO / "log_bskyapp.json")[0]["operation"])
    legacy = (
        b'{"did":"' + BSKY_DID.encode() + b'","cid":"' + BSKY_CID.encode()
        + b'","createdAt":"2023-04-12T04:53:57.057Z","operation":' + BSKY_GENESIS + b',"nullified":false}'
    )
    sequenced = (
        b'{"did":"' + BSKY_DID.encode() + b'","cid":"' + BSKY_CID.encode()
        + b'","seq":1234,"createdAt":"2023-04-12T04:53:57.057Z","operation":' + BSKY_GENESIS
        + b',"type":"sequenced_op"}'
    )
    assert render.export_line_legacy(BSKY_DID, op, BSKY_CID, BSKY_CREATED_MS, False) == legacy
    assert render.export_line_sequenced(BSKY_DID, op, BSKY_CID, BSKY_CREATED_MS, 1234) == sequenced
    row = render.OpRow(BSKY_DID, op, BSKY_CID, BSKY_CREATED_MS, False, 1234)
    assert render.export_lines([row], sequenced=False) == [legacy]
    assert render.export_lines([row], sequenced=True) == [sequenced]
    assert b"nullified" not in sequenced


def test_stream_message_key_order():
    op = shuffled(load(GO / "log_bskyapp.json")[0]["operation"])
    expected = (
        b'{"seq":9,"type":"sequenced_op","did":"' + BSKY_DID.encode() + b'","operation":' + BSKY_GENESIS
        + b',"cid":"' + BSKY_CID.encode() + b'","createdAt":"2023-04-12T04:53:57.057Z"}'
    )
    assert render.stream_message(BSKY_DID, op, BSKY_CID, BSKY_CREATED_MS, 9) == expected


def test_export_body_has_no_trailing_newline_and_is_empty_without_rows():
    log = replay_file(GO / "log_bskyapp.json")
    rows = render.rows_from_entries(log.did, log.entries, seqs=[7, 8])
    lines = render.export_lines(rows, sequenced=True)
    body = render.export_body(lines)
    assert body == lines[0] + b"\n" + lines[1]
    assert not body.endswith(b"\n")
    assert [orjson.loads(x)["seq"] for x in body.split(b"\n")] == [7, 8]
    assert render.export_body(render.export_lines([], sequenced=False)) == b""
    assert render.export_body(iter([])) == b""


def test_prerendered_op_bytes_embed_verbatim():
    op = load(GO / "log_bskyapp.json")[0]["operation"]
    pre = render.op_json(op)
    assert render.op_json(pre) is pre
    assert render.log_json([pre, op]) == b"[" + BSKY_GENESIS + b"," + BSKY_GENESIS + b"]"
    for render_with in (
        lambda o: render.export_line_legacy(BSKY_DID, o, BSKY_CID, BSKY_CREATED_MS, True),
        lambda o: render.export_line_sequenced(BSKY_DID, o, BSKY_CID, BSKY_CREATED_MS, 3),
        lambda o: render.stream_message(BSKY_DID, o, BSKY_CID, BSKY_CREATED_MS, 3),
        lambda o: render.audit_entry_json(BSKY_DID, o, BSKY_CID, BSKY_CREATED_MS, False),
        lambda o: render.audit_json([(BSKY_DID, o, BSKY_CID, BSKY_CREATED_MS, False)]),
    ):
        body = render_with(pre)
        assert body == render_with(op)
        assert b'"operation":' + BSKY_GENESIS in body


# ----------------------------------------------------------------------------- §7 item 33: key order
def test_integer_like_mixed_length_and_non_ascii_names_order_everywhere():
    ed = ed25519_did_key()
    vms = {  # insertion order deliberately differs from §1.9 order
        "atproto": K256_A,
        "zz": ed,
        "10": K256_B,
        "é": P256_B,
        "b": "did:key:zBogus0OIl",
        "2": P256_A,
        "01": K256_A,
        "4294967295": K256_B,
        "4294967294": ed,
    }
    expected_vm_order = ["2", "10", "4294967294", "b", "01", "zz", "é", "atproto", "4294967295"]
    services = {
        "é": {"endpoint": "https://e", "type": "E"},
        "a": {"endpoint": "https://a", "type": "A"},
        "ab": {"endpoint": "https://ab", "type": "AB"},
        "B": {"endpoint": "https://b", "type": "B"},
        "10": {"endpoint": "https://10", "type": "T10"},
        "2": {"endpoint": "https://2", "type": "T2"},
    }
    expected_service_order = ["2", "10", "B", "a", "ab", "é"]
    did, op = signed_genesis(vms, services, ["at://order.test"])
    entries = accepted_entries(did, op)

    vm_json = "{" + ",".join(f'"{n}":"{vms[n]}"' for n in expected_vm_order) + "}"
    svc_json = (
        "{"
        + ",".join(
            f'"{n}":{{"type":"{services[n]["type"]}","endpoint":"{services[n]["endpoint"]}"}}'
            for n in expected_service_order
        )
        + "}"
    )
    op_bytes = (
        f'{{"sig":"{op["sig"]}","prev":null,"type":"plc_operation","services":{svc_json},'
        f'"alsoKnownAs":["at://order.test"],"rotationKeys":["{op["rotationKeys"][0]}"],'
        f'"verificationMethods":{vm_json}}}'
    ).encode()
    assert render.log_json_from_entries(entries) == b"[" + op_bytes + b"]"
    assert render.log_last_json(entries[-1].op) == op_bytes

    data = render.data_json(did, entries[-1].op)
    assert data == (
        f'{{"did":"{did}","verificationMethods":{vm_json},"rotationKeys":["{op["rotationKeys"][0]}"],'
        f'"alsoKnownAs":["at://order.test"],"services":{svc_json}}}'
    ).encode()

    doc = orjson.loads(render.did_document_json(did, entries[-1].op))
    assert [m["id"] for m in doc["verificationMethod"]] == [f"{did}#{n}" for n in expected_vm_order]
    assert [s["id"] for s in doc["service"]] == [f"#{n}" for n in expected_service_order]
    endpoints = [services[n]["endpoint"] for n in expected_service_order]
    assert [s["serviceEndpoint"] for s in doc["service"]] == endpoints
    # walking in §1.9 order, "2" (P-256) comes before "10" (k256): ecdsa first, each once
    assert doc["@context"] == [
        "https://www.w3.org/ns/did/v1",
        "https://w3id.org/security/multikey/v1",
        ECDSA_CTX,
        K256_CTX,
    ]
    assert all(m["type"] == "Multikey" and m["controller"] == did for m in doc["verificationMethod"])
    assert doc["verificationMethod"][3]["publicKeyMultibase"] == "zBogus0OIl"


def test_context_order_follows_key_order_not_insertion_order():
    for vms, contexts in [
        ({"b": P256_A, "a": K256_A}, [K256_CTX, ECDSA_CTX]),
        ({"a": P256_A, "bb": K256_A}, [ECDSA_CTX, K256_CTX]),
        ({"bb": K256_A, "a": P256_A, "c": P256_B}, [ECDSA_CTX, K256_CTX]),
    ]:
        data = render.document_data("did:plc:x", {**_plain_op(), "verificationMethods": vms})
        assert render.did_document(data)["@context"][2:] == contexts


def _plain_op() -> dict:
    return {
        "type": "plc_operation",
        "rotationKeys": [K256_A],
        "verificationMethods": {"atproto": K256_A},
        "alsoKnownAs": ["at://x.test"],
        "services": {},
        "prev": None,
        "sig": "s",
    }


# ----------------------------------------------------------------------------- §7 item 34: escaping
def test_non_ascii_and_control_characters_in_also_known_as():
    aka = [
        "at://é日本😀",
        "at://a\x01\x1f\x7f\u2028\u2029b",
        'at://"\\\n\t\b\f\r',
        "at://</>&",
    ]
    expected = (
        '["at://é日本😀",'
        '"at://a\\u0001\\u001f\x7f\u2028\u2029b",'
        '"at://\\"\\\\\\n\\t\\b\\f\\r",'
        '"at://</>&"]'
    ).encode()
    did, op = signed_genesis({"atproto": K256_A}, {}, aka)
    entries = accepted_entries(did, op)
    assert b'"alsoKnownAs":' + expected + b"," in render.log_json_from_entries(entries)
    assert b'"alsoKnownAs":' + expected + b"," in render.data_json(did, entries[-1].op)
    doc = render.did_document_json(did, entries[-1].op)
    assert b'"alsoKnownAs":' + expected + b',"verificationMethod"' in doc
    assert b'"alsoKnownAs":' + expected + b"," in render.audit_json_from_entries(did, entries)
    assert "😀".encode() in expected and b"\\ud83d" not in expected  # raw UTF-8, not surrogate escapes


# ----------------------------------------------------------------------------- §7 item 21: tombstone
def test_tombstoned_did_has_no_data_or_document_but_keeps_its_log():
    path = GO / "log_tombstone.json"
    log = replay_file(path)
    tomb = log.head()
    assert tomb.tombstone and render.is_tombstone(tomb.op)
    assert render.document_data(log.did, tomb.op) is None
    assert render.data_json(log.did, tomb.op) is None
    assert render.did_document_json(log.did, tomb.op) is None
    expected_last = (
        b'{"sig":"iKFOLyEujXdHWujAAnwFhKfb9kkIcpMDGOV15eNWqlxLM2GtdQD3lVWCshTKWi0dF7InXGseVFDexS0kg0KmEQ",'
        b'"prev":"bafyreihqa4o4gsyai22ydms6j4cua6yr6tuc7trq2temvnycadk2daniru","type":"plc_tombstone"}'
    )
    assert render.log_last_json(render.latest_entry(log.entries).op) == expected_last
    body = render.log_json_from_entries(log.entries)
    assert body.endswith(b"," + expected_last + b"]")
    assert len(orjson.loads(body)) == 2
    assert render.error_body(render.not_available(log.did)) == (
        b'{"message":"DID not available: did:plc:6adr3q2labdllanslzhqkqd3"}'
    )


def test_did_without_verification_methods_gets_two_contexts():
    genesis = replay_file(GO / "log_tombstone.json").entries[0]
    assert render.did_document_json("did:plc:6adr3q2labdllanslzhqkqd3", genesis.op) == (
        b"{" + CTX2 + b'],"id":"did:plc:6adr3q2labdllanslzhqkqd3","alsoKnownAs":["at://op0"],'
        b'"verificationMethod":[],"service":[]}'
    )


def test_ed25519_and_unparseable_keys_are_multikey_without_context():
    ed = ed25519_did_key()
    off_curve = k256_did_key_off_curve()
    did, op = signed_genesis({"atproto": ed, "other": off_curve, "raw": "zNotADidKey"}, {}, [])
    entries = accepted_entries(did, op)
    doc = render.did_document_json(did, entries[-1].op)
    assert doc.startswith(b"{" + CTX2 + b'],"id":')
    methods = orjson.loads(doc)["verificationMethod"]
    assert methods == [
        {"id": f"{did}#raw", "type": "Multikey", "controller": did, "publicKeyMultibase": "zNotADidKey"},
        {"id": f"{did}#other", "type": "Multikey", "controller": did, "publicKeyMultibase": off_curve[8:]},
        {"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": ed[8:]},
    ]
    assert ed[8:].startswith("z6Mk")
    assert render.key_context(ed) is None and render.key_context(off_curve) is None
    assert render.key_context(K256_A) == K256_CTX and render.key_context(P256_A) == ECDSA_CTX


# ----------------------------------------------------------------------------- legacy normalisation
@pytest.mark.parametrize(
    ("handle", "aka"),
    [
        ("dan.bsky.social", "at://dan.bsky.social"),
        ("at://dan.bsky.social", "at://dan.bsky.social"),
        ("http://foo.https://bar", "at://foo.bar"),  # first http:// then first https://, anywhere
        ("xhttps://yhttp://z", "at://xyz"),
        ("https://http://dan", "at://dan"),
        ("a/https://b/https://c", "at://a/b/https://c"),  # only the first https:// goes
    ],
)
def test_legacy_handle_becomes_at_uri(handle, aka):
    op = {**_legacy_op(), "handle": handle}
    assert render.document_data("did:plc:x", op)["alsoKnownAs"] == [aka]
    assert orjson.loads(render.did_document_json("did:plc:x", op))["alsoKnownAs"] == [aka]
    assert orjson.loads(render.op_json(op))["handle"] == handle  # the raw op is untouched


@pytest.mark.parametrize(
    ("service", "endpoint"),
    [
        ("bsky.social", "https://bsky.social"),
        ("http://pds.local", "http://pds.local"),
        ("https://pds.example", "https://pds.example"),
        ("HTTPS://pds.example", "https://HTTPS://pds.example"),
    ],
)
def test_legacy_service_gets_an_http_prefix(service, endpoint):
    op = {**_legacy_op(), "service": service}
    data = render.data_json("did:plc:x", op)
    assert data.endswith(
        b'"services":{"atproto_pds":{"type":"AtprotoPersonalDataServer",'
        b'"endpoint":"' + endpoint.encode() + b'"}}}'
    )
    assert orjson.loads(render.did_document_json("did:plc:x", op))["service"] == [
        {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": endpoint}
    ]


def _legacy_op() -> dict:
    return {
        "type": "create",
        "signingKey": K256_A,
        "recoveryKey": P256_A,
        "handle": "h.test",
        "service": "https://s.test",
        "prev": None,
        "sig": "s",
    }


def test_legacy_rotation_keys_are_recovery_then_signing():
    data = render.document_data("did:plc:x", _legacy_op())
    assert data["rotationKeys"] == [P256_A, K256_A]
    assert data["verificationMethods"] == {"atproto": K256_A}
    assert orjson.loads(render.did_document_json("did:plc:x", _legacy_op()))["@context"][2:] == [K256_CTX]


# ----------------------------------------------------------------------------- nullification
def test_nullified_ops_leave_log_but_stay_in_audit():
    log = replay_file(GO / "log_nullification.json")
    cids = [e.cid for e in log.entries]
    body = orjson.loads(render.log_json_from_entries(log.entries))
    assert len(body) == 2 and body[1]["sig"] == log.entries[2].op["sig"]
    audit = orjson.loads(render.audit_json_from_entries(log.did, log.entries))
    assert [(a["cid"], a["nullified"]) for a in audit] == list(zip(cids, [False, True, False]))
    assert render.latest_entry(log.entries) is log.entries[2]
    gone = log.entries[1]
    line = render.export_line_legacy(log.did, gone.op, gone.cid, gone.created_at, gone.nullified)
    line = orjson.loads(line)
    assert line["cid"] == gone.cid and line["nullified"] is True
    assert render.latest_entry([]) is None


# ----------------------------------------------------------------------------- misc
def test_error_bodies_and_messages():
    body = render.error_body(render.not_registered("favicon.ico"))
    assert body == b'{"message":"DID not registered: favicon.ico"}'
    assert render.not_available("did:plc:abc") == "DID not available: did:plc:abc"
    assert render.error_body('a "quoted" é\n') == b'{"message":"a \\"quoted\\" \xc3\xa9\\n"}'


def test_created_at_is_milliseconds_with_z():
    op = _plain_op()
    epoch = render.audit_entry_json("did:plc:x", op, "c", 0, False)
    assert epoch.endswith(b'"createdAt":"1970-01-01T00:00:00.000Z"}')
    later = render.stream_message("did:plc:x", op, "c", 1681275237050, 1)
    assert later.endswith(b'"createdAt":"2023-04-12T04:53:57.050Z"}')


def test_key_order_cache_stays_bounded_and_correct():
    for i in range(jsonfmt._ORDER_CACHE_MAX + 10):
        op = {**_plain_op(), "verificationMethods": {f"k{i}": "x", "a": "y"}}
        assert list(orjson.loads(render.op_json(op))["verificationMethods"]) == ["a", f"k{i}"]
    assert len(jsonfmt._ORDER_CACHE) <= jsonfmt._ORDER_CACHE_MAX


_names = st.one_of(
    st.sampled_from(
        ["", "0", "1", "2", "10", "01", "4294967294", "4294967295", "-1", "1.5", "é", "ab", "B", "a", "日"]
    ),
    st.text(max_size=4),
    st.integers(min_value=0, max_value=2**33).map(str),
)
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.text(max_size=3)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(_names, children, max_size=5)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_op_order_matches_the_plain_rule_and_leaves_input_alone(value):
    def plain(v):  # §1.9 spelled out: integer-like keys ascending, then (UTF-8 length, bytes)
        if isinstance(v, dict):
            def key(k):
                b = k.encode()
                if jsonfmt.is_array_index(k):
                    return (0, int(k), b"")
                return (1, len(b), b)

            return {k: plain(v[k]) for k in sorted(v, key=key)}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    before = copy.deepcopy(value)
    for _ in range(2):  # the second pass runs on cached key orders
        out = jsonfmt.op_order(value)
        assert json.dumps(out) == json.dumps(plain(value))
        assert value == before and json.dumps(value) == json.dumps(before)
