"""Property tests (hypothesis) for the pure core: signatures, CIDs, tamper detection, robustness
against arbitrary input, and random op chains replayed against a small model of the rules.

Example counts are kept modest so the whole file runs in well under a minute.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from plc.core import chain, encoding, jsonfmt
from plc.core.chain import REPLAY, SUBMIT, DidLog
from plc.core.didkey import K256, P256, parse_rotation_key
from plc.core.errors import OpError, Reason
from plc.core.signatures import SigningKey, decode_sig, encode_sig, is_low_s, verify_digest

from plcdata import (
    DAY,
    HOUR,
    NOW,
    WINDOW,
    genesis,
    k256,
    p256,
    parse_iso_ms,
    ref_cid,
    ref_dag_cbor,
    tombstone,
    update,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values a JSON parser (orjson, which the project uses everywhere) can produce
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
# JSON-like data that DAG-CBOR encodes exactly (no floats: ops never hold any)
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=20,
)


# ----------------------------------------------------------------------------- signatures
@FAST
@given(
    curve=st.sampled_from([K256, P256]), seed=st.binary(min_size=1, max_size=16), data=st.binary(max_size=300)
)
def test_sign_then_verify(curve, seed, data):
    key = SigningKey.from_seed(curve, seed)
    sig_text = key.sign(data)
    raw = decode_sig(sig_text)
    assert encode_sig(raw) == sig_text and len(sig_text) == 86
    assert is_low_s(curve, raw)
    pk = parse_rotation_key(key.did_key)
    assert verify_digest(pk, hashlib.sha256(data).digest(), raw)
    assert not verify_digest(pk, hashlib.sha256(data + b"\x00").digest(), raw)


# ----------------------------------------------------------------------------- CIDs
def _shuffled(value: Any, rnd) -> Any:
    if isinstance(value, dict):
        keys = list(value)
        rnd.shuffle(keys)
        return {k: _shuffled(value[k], rnd) for k in keys}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@FAST
@given(
    value=st.dictionaries(st.text(max_size=6), cbor_values, max_size=6), rnd=st.randoms(use_true_random=False)
)
def test_cid_does_not_depend_on_key_order(value, rnd):
    shuffled = _shuffled(value, rnd)
    cbor = encoding.dag_cbor(value)
    assert encoding.dag_cbor(shuffled) == cbor == ref_dag_cbor(value)
    assert encoding.op_cid(shuffled) == encoding.op_cid(value) == ref_cid(value)


@FAST
@given(rnd=st.randoms(use_true_random=False), n=st.integers(0, 3))
def test_signed_op_cid_and_validity_survive_key_shuffles(rnd, n):
    keys = [k256("shuf0"), p256("shuf1"), k256("shuf2")][: n + 1]
    vms = {"atproto": keys[0].did_key, "10": keys[-1].did_key, "2": "did:key:z2"}
    did, op = genesis(keys[-1], keys, vms=vms)
    shuffled = _shuffled(op, rnd)
    acc = chain.check_op(None, did, shuffled, mode=SUBMIT, created_at=NOW)
    assert acc.cid == ref_cid(op) and encoding.did_for_genesis(shuffled) == did


# ----------------------------------------------------------------------------- tampering
SIGNERS = [k256("tamper-a"), p256("tamper-b")]


def _base_ops(variant: int) -> tuple[str, DidLog | None, dict, int]:
    """(did, log to check against, signed op, createdAt): a genesis or an update on a genesis."""
    a, b = SIGNERS
    rotation = [a, b] if variant % 2 else [b, a]
    aka = ["at://tamper.test", "at://x.test"]
    did, g = genesis(rotation[0], rotation, aka=aka, vms={"atproto": a.did_key})
    if variant < 2:
        return did, None, g, NOW
    log = DidLog(did)
    log.apply(chain.check_op(log, did, g, mode=REPLAY, created_at=NOW))
    op = update(ref_cid(g), rotation[1], rotation, aka=["at://after.test"])
    return did, log, op, NOW + 1000


def _string_locations(op: dict) -> list[tuple]:
    """Every string of the op that could be altered: ('value', path) or ('key', path)."""
    locs: list[tuple] = [("key", (k,)) for k in op]
    for k, v in op.items():
        if isinstance(v, str):
            locs.append(("value", (k,)))
        elif isinstance(v, list):
            locs += [("value", (k, i)) for i, x in enumerate(v)]
        elif isinstance(v, dict):
            for kk, vv in v.items():
                locs.append(("key", (k, kk)))
                if isinstance(vv, str):
                    locs.append(("value", (k, kk)))
                else:
                    locs += [("key", (k, kk, f)) for f in vv] + [("value", (k, kk, f)) for f in vv]
    return locs


def _get(op: dict, kind: str, path: tuple) -> str:
    if kind == "key":
        return path[-1]
    node: Any = op
    for p in path:
        node = node[p]
    return node


def _set(op: dict, kind: str, path: tuple, new: str) -> dict:
    op = orjson.loads(orjson.dumps(op))  # deep copy, key order kept
    parent: Any = op
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if kind == "value":
        parent[last] = new
    else:
        items = [(new if k == last else k, v) for k, v in parent.items()]
        parent.clear()
        parent.update(items)
    return op


def _expected(kind: str, path: tuple, new: str, mode: str, with_cid: bool) -> set[str]:
    """The reasons an op altered at `path` may be rejected with."""
    out = set()
    if "\x00" in new and mode == REPLAY:
        out.add(Reason.NUL_CHARACTER)  # replay refuses unstorable text before anything else
    if kind == "key" and len(path) in (1, 3) or (kind == "value" and path == ("type",)):
        return out | {Reason.INVALID_SHAPE}  # a top-level / service field name, or the type
    if "\x00" in new:
        out.add(Reason.NUL_CHARACTER)
    if with_cid:
        return out | {Reason.CID_MISMATCH}
    if kind == "value" and path == ("sig",):
        return out | {Reason.SIG_INVALID, Reason.SIG_HIGH_S, Reason.SIG_ENCODING, Reason.SIG_PADDING}
    if kind == "value" and path == ("prev",):
        return out | {Reason.PREV_MALFORMED, Reason.MISORDERED}
    out.add(Reason.SIG_INVALID)
    if kind == "value" and path[0] == "rotationKeys":
        out.add(Reason.UNSUPPORTED_KEY)  # a genesis key that no longer parses, reached by the scan
    if mode == SUBMIT:
        out.add(Reason.CONSTRAINT)  # e.g. a rotation key that no longer parses, a duplicate aka
    return out


@MEDIUM
@given(data=st.data(), variant=st.integers(0, 3))
def test_any_single_character_change_is_rejected(data, variant):
    did, log, op, at = _base_ops(variant)
    locs = _string_locations(op)
    kind, path = data.draw(st.sampled_from(locs))
    old = _get(op, kind, path)
    pos = data.draw(st.integers(0, max(0, len(old) - 1)))
    char = data.draw(st.characters().filter(lambda c: c != (old[pos] if old else None)))
    new = old[:pos] + char + old[pos + 1 :] if old else char
    tampered = _set(op, kind, path, new)
    assert tampered != op
    for mode, cid in ((REPLAY, ref_cid(op)), (REPLAY, None), (SUBMIT, None)):
        with pytest.raises(OpError) as exc:
            chain.check_op(log, did, tampered, mode=mode, created_at=at, cid=cid)
        assert exc.value.reason in _expected(kind, path, new, mode, cid is not None), (mode, kind, path, new)


@MEDIUM
@given(variant=st.integers(0, 3), index=st.integers(0, 63), mask=st.integers(1, 255))
def test_any_signature_byte_flip_is_rejected(variant, index, mask):
    did, log, op, at = _base_ops(variant)
    raw = bytearray(decode_sig(op["sig"]))
    raw[index] ^= mask
    tampered = {**op, "sig": encode_sig(bytes(raw))}
    for mode in (REPLAY, SUBMIT):
        with pytest.raises(OpError) as exc:
            chain.check_op(log, did, tampered, mode=mode, created_at=at)
        assert exc.value.reason in (Reason.SIG_INVALID, Reason.SIG_HIGH_S)
        assert exc.value.status == 400 and exc.value.message.startswith("Invalid signature on op: ")
    with pytest.raises(OpError) as exc:
        chain.check_op(log, did, tampered, mode=REPLAY, created_at=at, cid=ref_cid(op))
    assert exc.value.reason == Reason.CID_MISMATCH


# ----------------------------------------------------------------------------- robustness
OP_KEYS = [
    *("type", "rotationKeys", "verificationMethods", "alsoKnownAs", "services", "prev", "sig"),
    *("signingKey", "recoveryKey", "handle", "service"),
]
TYPES = st.sampled_from(["plc_operation", "plc_tombstone", "create", "other"])
op_like = st.fixed_dictionaries(
    {"type": TYPES | json_values},
    optional={k: json_values | st.text(max_size=90) for k in OP_KEYS[1:]},
)
_ROBUST_DID, _ROBUST_G = genesis(k256("robust"), [k256("robust")])


def _robust_log() -> DidLog:
    log = DidLog(_ROBUST_DID)
    log.apply(chain.check_op(log, _ROBUST_DID, _ROBUST_G, mode=REPLAY, created_at=NOW))
    return log


def _only_op_errors(body: Any, did: str, cid: str | None = None) -> None:
    for mode in (REPLAY, SUBMIT):
        for log in (None, _robust_log()):
            try:
                acc = chain.check_op(log, did, body, mode=mode, created_at=NOW + 1, cid=cid)
            except OpError as exc:
                assert exc.reason and exc.message and exc.status in (400, 500)
            else:
                assert isinstance(acc, chain.Accepted)


@FAST
@given(body=json_values, did=st.text(max_size=40))
def test_arbitrary_json_gives_only_op_errors(body, did):
    _only_op_errors(body, did)


@FAST
@given(body=op_like, cid=st.none() | st.text(max_size=60))
def test_op_like_dicts_give_only_op_errors(body, cid):
    _only_op_errors(body, _ROBUST_DID, cid)


@FAST
@given(field=st.sampled_from(OP_KEYS[:7]), value=json_values, inner=st.booleans())
def test_valid_op_with_one_field_replaced_gives_only_op_errors(field, value, inner):
    body = orjson.loads(orjson.dumps(_ROBUST_G))
    if inner and field in ("services", "verificationMethods"):
        key = next(iter(body[field]))
        body[field][key] = value
    else:
        body[field] = value
    body_prev = {**body, "prev": ref_cid(_ROBUST_G)} if field != "prev" else body
    _only_op_errors(body, _ROBUST_DID)
    _only_op_errors(body_prev, _ROBUST_DID)


def test_parser_domain_excludes_lone_surrogates_and_huge_integers():
    """The core is fed by orjson, which refuses lone surrogates and turns integers beyond 64 bits
    into floats; the robustness properties above cover exactly that domain."""
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads('{"a":"\\ud800"}')
    assert isinstance(orjson.loads('{"a":100000000000000000000}')["a"], float)
    assert isinstance(orjson.loads('{"a":-9223372036854775809}')["a"], float)
    body = orjson.loads('{"type":"plc_operation","x":100000000000000000000,"y":18446744073709551615}')
    _only_op_errors(body, _ROBUST_DID)


@FAST
@given(x=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**70), 2**70).map(float))
def test_js_number_text_round_trips_and_follows_v8_notation(x):
    """Numbers echoed in `Not a valid operation` messages: V8 prints the shortest text that reads
    back as the same double, plain from 1e-6 to below 1e21, exponent form outside, -0 as 0."""
    text = jsonfmt.js_number(x)
    assert float(text) == x
    if x == 0:
        assert text == "0"
    elif 1e-6 <= abs(x) < 1e21:
        assert "e" not in text
        if x == int(x):
            assert text.lstrip("-").isdigit()  # shortest digits, zero-padded: 2**64 → 18446744073709552000
            if abs(x) < 2**53:
                assert text == str(int(x))
    else:
        assert re.fullmatch(r"-?\d(\.\d+)?e[+-]\d+", text), text
    assert len(text.lstrip("-").replace(".", "").split("e")[0].strip("0")) <= 17  # shortest digits


# ----------------------------------------------------------------------------- random chains
POOL = [k256("m0"), p256("m1"), k256("m2"), p256("m3"), k256("m4")]
DELTAS = st.sampled_from([1, 1000, HOUR, DAY, 3 * DAY, WINDOW, WINDOW + 1]) | st.integers(1, 4 * DAY)


@dataclass
class ModelOp:
    cid: str
    at: int
    keys: tuple[str, ...]  # did:keys that may sign a child
    signer: int
    tomb: bool
    nullified: bool = False


POOL_BY_DID_KEY = {k.did_key: k for k in POOL}


def _pick_key(draw, parent: ModelOp) -> SigningKey:
    """Mostly one of the parent's rotation keys (any priority), sometimes any pool key."""
    listed = [POOL_BY_DID_KEY[k] for k in parent.keys]
    if listed and draw(st.integers(0, 5)) < 5:
        return draw(st.sampled_from(listed))
    return draw(st.sampled_from(POOL))


def _index(keys: tuple[str, ...], key: SigningKey) -> int:
    return keys.index(key.did_key) if key.did_key in keys else -1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_chains_replay_to_the_model(data):
    """Build a random history with updates, tombstones, recoveries (in and out of the window,
    with enough and with too little authority) and ops on stale or tombstoned heads; track the
    expected verdicts and nullified flags by construction; replay must agree exactly."""
    draw = data.draw
    rot = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True))
    signer = draw(st.sampled_from(rot))
    did, g = genesis(signer, rot, aka=["at://g.test"])
    t = NOW
    model = [ModelOp(ref_cid(g), t, tuple(k.did_key for k in rot), -1, False)]
    live = [0]
    items: list[tuple[dict, int, str]] = [(g, t, ref_cid(g))]
    expected_rejects: list[tuple[int, str]] = []

    for step in range(draw(st.integers(1, 10))):
        head = model[live[-1]]
        action = draw(st.sampled_from(["update", "fork", "update", "fork", "tombstone", "stale"]))
        # mostly keep the keys, sometimes rotate, rarely freeze (hypothesis favours small draws)
        rot_choice = draw(st.integers(0, 11))
        if rot_choice == 11:
            new_rot = []
        elif rot_choice >= 8 or not head.keys:
            new_rot = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True))
        else:
            new_rot = [POOL_BY_DID_KEY[k] for k in head.keys]
        aka = [f"at://s{step}.test"]
        make_tomb = action == "tombstone" or (action == "fork" and draw(st.booleans()))

        if action == "fork" and len(live) >= 2:
            p = draw(st.integers(0, len(live) - 2))
            parent, disputed = model[live[p]], model[live[p + 1]]
            key = _pick_key(draw, parent)
            timing = draw(st.sampled_from(["soon", "edge", "late", "not_after_head"]))
            if timing == "soon":
                at = head.at + draw(st.integers(1, 2 * HOUR))
            elif timing == "edge":
                at = max(disputed.at + WINDOW, head.at + 1)
            elif timing == "late":
                at = max(disputed.at + WINDOW + draw(st.integers(1, DAY)), head.at + 1)
            else:
                at = head.at - draw(st.integers(0, HOUR))
            j = _index(parent.keys, key)
            if j < 0 or j >= disputed.signer:
                verdict = Reason.SIG_INVALID
            elif at <= head.at:
                verdict = Reason.MISORDERED
            elif at - disputed.at > WINDOW:
                verdict = Reason.LATE_RECOVERY
            else:
                verdict = None
            prev = parent.cid
        else:
            parent = head
            key = _pick_key(draw, parent)
            stale = action == "stale"
            at = head.at if stale else head.at + draw(DELTAS)
            j = _index(parent.keys, key)
            if parent.tomb:
                verdict = Reason.MISORDERED
            elif j < 0:
                verdict = Reason.SIG_INVALID
            elif stale:
                verdict = Reason.TIMESTAMP_ORDER
            else:
                verdict = None
            prev = parent.cid

        op = tombstone(prev, key) if make_tomb else update(prev, key, new_rot, aka=aka)
        if make_tomb:  # tombstones have no content to make them unique: vary the key/prev only
            if any(ref_cid(op) == m.cid for m in model) or any(ref_cid(op) == c for _, _, c in items):
                continue
        cid = ref_cid(op)
        items.append((op, at, cid))
        if verdict is not None:
            expected_rejects.append((len(items) - 1, verdict))
            continue
        keys = () if make_tomb else tuple(k.did_key for k in new_rot)
        if prev != head.cid:  # a recovery: everything after the parent is discarded
            p = [model[i].cid for i in live].index(prev)
            for i in live[p + 1 :]:
                model[i].nullified = True
            live = live[: p + 1]
        model.append(ModelOp(cid, at, keys, j, make_tomb))
        live.append(len(model) - 1)

    for _, reason in expected_rejects:
        event(f"rejected: {reason}")
    if any(m.nullified for m in model):
        event("some op nullified")
    if any(m.tomb and m.nullified for m in model):
        event("a tombstone nullified")

    log, rejected = chain.replay(did, items)

    assert [(i, e.reason) for i, e in rejected] == expected_rejects
    assert [e.cid for e in log.entries] == [m.cid for m in model]
    assert [e.nullified for e in log.entries] == [m.nullified for m in model]
    assert [e.signer for e in log.entries] == [m.signer for m in model]
    assert [e.cid for e in log.live] == [model[i].cid for i in live]
    assert [e.tombstone for e in log.entries] == [m.tomb for m in model]


# ----------------------------------------------------------------------------- generated corpora
GENERATOR = Path(__file__).resolve().parents[1] / "plc" / "tools" / "generate.py"


@pytest.mark.skipif(not GENERATOR.exists(), reason="plc/tools/generate.py not written yet")
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    fmt=st.sampled_from(["sequenced", "legacy"]),
    invalid_rate=st.sampled_from([0.0, 0.05, 0.3]),
    p256_share=st.sampled_from([0.0, 0.1, 0.6]),
)
def test_generated_corpus_replays_to_its_truth(seed, fmt, invalid_rate, p256_share):
    from plc.tools.generate import generate

    rows = list(generate(seed, 14, fmt=fmt, invalid_rate=invalid_rate, p256_share=p256_share))
    assert rows
    by_did: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for n, (line, truth) in enumerate(rows, 1):
        rec = orjson.loads(line)
        assert truth["line"] == n and rec["did"] == truth["did"] and rec["cid"] == truth["cid"]
        assert ("seq" in rec) == (fmt == "sequenced") and ("nullified" in rec) == (fmt == "legacy")
        if fmt == "legacy":
            assert rec["nullified"] == truth["nullified"]
        by_did[rec["did"]].append((rec, truth))
    if invalid_rate == 0:
        assert all(t["valid"] for _, t in rows)
    for did, recs in by_did.items():
        items = [(rec["operation"], parse_iso_ms(rec["createdAt"]), rec["cid"]) for rec, _ in recs]
        log, rejected = chain.replay(did, items)
        got = {i: e.reason for i, e in rejected}
        want = {i: t["reason"] for i, (_, t) in enumerate(recs) if not t["valid"]}
        assert got == want, did
        accepted = [t for _, t in recs if t["valid"]]
        assert [e.cid for e in log.entries] == [t["cid"] for t in accepted]
        assert [e.nullified for e in log.entries] == [t["nullified"] for t in accepted]
