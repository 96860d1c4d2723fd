"""The invalid ops of the synthetic directory: every kind a replaying verifier must reject.

Each kind knows the `Reason` the core gives for it, when it can be aimed at a DID's current
state (`applicable`) and how to build it (`build`). The outcome follows from construction:
the op is placed where the chain rules (spec §4, checked in the order `chain.check_op` uses)
leave only that verdict. Invalid ops are never committed to the DID's chain, so later valid
ops never build on them.

Placement: an invalid op sits strictly after everything its DID has so far (`cursor`) and,
inside a recovery scenario, strictly before the op that must still follow (`hi`). A few kinds
sit at exactly the head's createdAt (their CID is re-rolled until it sorts after the head),
and three sit before the DID's genesis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.didkey import K256, P256
from ..core.encoding import did_for_cbor
from ..core.errors import Reason
from ..core.signatures import SigningKey, der_encode, encode_sig
from ._gen_model import (
    B64URL_ALPHABET,
    DAY_MS,
    HOUR_MS,
    PRE_GENESIS_MS,
    WINDOW_MS,
    Ctx,
    DidState,
    Record,
    curve_keys,
    first_index,
    make_doc,
    pds_services,
    plc_op,
    render,
    seal,
    usual_key,
    with_handle,
)

Hi = int | None


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    reason: str
    applicable: Callable[[Ctx, DidState, Hi], bool]
    build: Callable[[Ctx, DidState, Hi], None]


# ----------------------------------------------------------------------------- placement
def _room(st: DidState, hi: Hi) -> bool:
    return hi is None or st.cursor + 1 < hi


def _next_t(ctx: Ctx, st: DidState, hi: Hi) -> int:
    """A createdAt after everything the DID has so far (and before `hi`); moves the cursor."""
    lo = st.cursor + 1
    top = lo + ctx.loguniform(1, 6 * HOUR_MS) - 1
    if hi is not None:
        top = min(top, hi - 1)
    t = ctx.rng.randint(lo, top)
    st.cursor = t
    return t


def _pre_genesis_ok(ctx: Ctx, st: DidState, hi: Hi) -> bool:
    return len(st.entries) == 1 and st.t0 - 1 >= ctx.start_ms


def _pre_genesis_t(ctx: Ctx, st: DidState) -> int:
    return ctx.rng.randint(max(ctx.start_ms, st.t0 - PRE_GENESIS_MS), st.t0 - 1)


def _add(
    ctx: Ctx, st: DidState, t: int, op: dict[str, Any], cid: str, kind: str, did: str | None = None
) -> None:
    rec = Record(t, cid, ctx.serial(), did or st.did, render(op), False, KINDS[kind].reason, kind)
    if did is None:
        st.records.append(rec)
    else:
        ctx.extra.append(rec)


def _head_ok(st: DidState) -> bool:
    return not st.head().tomb


def _head_update(ctx: Ctx, st: DidState) -> tuple[dict[str, Any], SigningKey]:
    """A plausible handle change on top of the live head (or its last document)."""
    base = st.base()
    op = plc_op(with_handle(base.document(), ctx.handle(st.pds)), st.head().cid)
    return op, usual_key(ctx, st, st.head().keys or base.keys)


# ----------------------------------------------------------------------------- signature kinds
def _high_s(curve: str) -> tuple[Callable[[Ctx, DidState, Hi], bool], Callable[[Ctx, DidState, Hi], None]]:
    def applicable(ctx: Ctx, st: DidState, hi: Hi) -> bool:
        return _room(st, hi) and _head_ok(st) and bool(curve_keys(st, ctx, st.head().keys, curve))

    def build(ctx: Ctx, st: DidState, hi: Hi) -> None:
        op, _ = _head_update(ctx, st)
        key = curve_keys(st, ctx, st.head().keys, curve)[0]
        _, cid = seal(op, key, high_s=True)
        _add(ctx, st, _next_t(ctx, st, hi), op, cid, f"sig_high_s_{curve}")

    return applicable, build


def _mangled(kind: str, mangle: Callable[[bytes, Any], str]) -> Callable[[Ctx, DidState, Hi], None]:
    def build(ctx: Ctx, st: DidState, hi: Hi) -> None:
        op, key = _head_update(ctx, st)
        _, cid = seal(op, key, mangle=lambda raw: mangle(raw, ctx.rng))
        _add(ctx, st, _next_t(ctx, st, hi), op, cid, kind)

    return build


def _on_head(ctx: Ctx, st: DidState, hi: Hi) -> bool:
    return _room(st, hi) and _head_ok(st)


def _tail_bits(raw: bytes, rng: Any) -> str:
    """Strict base64url, but the 4 unused bits of the last character are not zero."""
    sig = encode_sig(raw)
    v = B64URL_ALPHABET.index(sig[-1])
    return sig[:-1] + B64URL_ALPHABET[v | rng.randint(1, 15)]


def _build_std_b64(ctx: Ctx, st: DidState, hi: Hi) -> None:
    """Standard base64 ('+' '/'): re-rolled until the signature has a character that differs."""
    while True:
        op, key = _head_update(ctx, st)
        _, cid = seal(op, key, mangle=lambda raw: encode_sig(raw).replace("-", "+").replace("_", "/"))
        if "+" in op["sig"] or "/" in op["sig"]:
            break
    _add(ctx, st, _next_t(ctx, st, hi), op, cid, "sig_std_base64")


def _build_wrong_key(ctx: Ctx, st: DidState, hi: Hi) -> None:
    op, _ = _head_update(ctx, st)
    _, cid = seal(op, ctx.rng.choice(ctx.strangers))
    _add(ctx, st, _next_t(ctx, st, hi), op, cid, "sig_wrong_key")


# ----------------------------------------------------------------------------- genesis kinds
def _stray_genesis(ctx: Ctx, st: DidState, prev: str | None) -> tuple[dict[str, Any], SigningKey]:
    pds = ctx.pds[st.pds]
    handle = ctx.handle(st.pds)
    doc = make_doc([pds.key.did_key], st.vm.did_key, ["at://" + handle], pds_services(ctx.endpoint(st.pds)))
    return plc_op(doc, prev), pds.key


def _build_genesis_hash(ctx: Ctx, st: DidState, hi: Hi) -> None:
    op, key = _stray_genesis(ctx, st, None)
    _, cid = seal(op, key)
    _add(ctx, st, _pre_genesis_t(ctx, st), op, cid, "genesis_wrong_did")


def _build_genesis_bad_sig(ctx: Ctx, st: DidState, hi: Hi) -> None:
    op, _ = _stray_genesis(ctx, st, None)
    _, cid = seal(op, ctx.rng.choice(ctx.strangers))
    _add(ctx, st, _pre_genesis_t(ctx, st), op, cid, "genesis_unlisted_key")


def _build_tombstone_first(ctx: Ctx, st: DidState, hi: Hi) -> None:
    op: dict[str, Any] = {"type": "plc_tombstone", "prev": ctx.random_cid()}
    _, cid = seal(op, ctx.pds[st.pds].key)
    _add(ctx, st, _pre_genesis_t(ctx, st), op, cid, "tombstone_first")


def _build_genesis_prev(ctx: Ctx, st: DidState, hi: Hi) -> None:
    """A genesis with a non-null prev, filed under the DID it hashes to (a DID of its own)."""
    op, key = _stray_genesis(ctx, st, st.head().cid)
    signed, cid = seal(op, key)
    t = st.cursor + ctx.loguniform(1, HOUR_MS)
    _add(ctx, st, t, op, cid, "genesis_prev", did=did_for_cbor(signed))


# ----------------------------------------------------------------------------- chain kinds
def _build_misordered(
    kind: str, prev: Callable[[Ctx, DidState], str | None]
) -> Callable[[Ctx, DidState, Hi], None]:
    def build(ctx: Ctx, st: DidState, hi: Hi) -> None:
        base = st.base()
        op = plc_op(with_handle(base.document(), ctx.handle(st.pds)), prev(ctx, st))
        _, cid = seal(op, usual_key(ctx, st, base.keys))
        _add(ctx, st, _next_t(ctx, st, hi), op, cid, kind)

    return build


def _nullified_cid(ctx: Ctx, st: DidState) -> str:
    return ctx.rng.choice([e for e in st.entries if e.nullified]).cid


def _build_fork_low(ctx: Ctx, st: DidState, hi: Hi) -> None:
    """A fork signed by the disputed op's own key or a lower-priority one (or a stranger)."""
    i = ctx.rng.randrange(len(st.live) - 1)
    parent, disputed = st.live[i], st.live[i + 1]
    weak = [k for j, k in enumerate(parent.keys) if j >= disputed.signer and first_index(parent.keys, k) == j]
    keys = [sk for sk in (ctx.key_for(st, k) for k in weak) if sk is not None]
    key = ctx.rng.choice(ctx.strangers) if not keys or ctx.rng.random() < 0.15 else ctx.rng.choice(keys)
    op = plc_op(with_handle(parent.document(), ctx.handle(st.pds)), parent.cid)
    _, cid = seal(op, key)
    _add(ctx, st, _next_t(ctx, st, hi), op, cid, "fork_weak_key")


def _late_points(st: DidState, hi: Hi) -> list[tuple[int, int]]:
    """(fork index, earliest createdAt) for forks whose recovery window has run out."""
    out = []
    for i in st.fork_points():
        t = max(st.cursor + 1, st.live[i + 1].t + WINDOW_MS + 1)
        if hi is None or t < hi:
            out.append((i, t))
    return out


def _build_late(ctx: Ctx, st: DidState, hi: Hi) -> None:
    i, t = ctx.rng.choice(_late_points(st, hi))
    if ctx.rng.random() < 0.7:
        t += ctx.loguniform(1, 30 * DAY_MS)
        if hi is not None:
            t = min(t, hi - 1)
    parent = st.live[i]
    op = plc_op(with_handle(parent.document(), ctx.handle(st.pds)), parent.cid)
    _, cid = seal(op, ctx.held(st, parent.keys[0]))
    st.cursor = t
    _add(ctx, st, t, op, cid, "late_recovery")


def _at_head(
    ctx: Ctx, st: DidState, make: Callable[[], tuple[dict[str, Any], SigningKey]], kind: str
) -> None:
    """Place an op at exactly the head's createdAt, re-rolled until its CID sorts after the head's
    (the export orders by createdAt then CID, so it still comes after the head in the file)."""
    head = st.head()
    while True:
        op, key = make()
        _, cid = seal(op, key)
        if cid > head.cid:
            break
    _add(ctx, st, head.t, op, cid, kind)


def _ts_order_ok(ctx: Ctx, st: DidState, hi: Hi) -> bool:
    head = st.head()
    return not head.tomb and usual_key(ctx, st, head.keys).did_key in head.keys


def _build_ts_order(ctx: Ctx, st: DidState, hi: Hi) -> None:
    _at_head(ctx, st, lambda: _head_update(ctx, st), "timestamp_not_after_prev")


def _build_not_after_head(ctx: Ctx, st: DidState, hi: Hi) -> None:
    """A recovery a high enough key signed, but not later than the current head."""
    i = ctx.rng.choice(st.fork_points())
    parent = st.live[i]
    key = ctx.held(st, parent.keys[0])

    def make() -> tuple[dict[str, Any], SigningKey]:
        return plc_op(with_handle(parent.document(), ctx.handle(st.pds)), parent.cid), key

    _at_head(ctx, st, make, "recovery_not_after_head")


# ----------------------------------------------------------------------------- shape and content kinds
def _shaped(kind: str, change: Callable[[Ctx, dict[str, Any]], None]) -> Callable[[Ctx, DidState, Hi], None]:
    def build(ctx: Ctx, st: DidState, hi: Hi) -> None:
        op, key = _head_update(ctx, st)
        change(ctx, op)
        _, cid = seal(op, key)
        _add(ctx, st, _next_t(ctx, st, hi), op, cid, kind)

    return build


def _extra_top(ctx: Ctx, op: dict[str, Any]) -> None:
    field, value = ctx.rng.choice(
        [("handle", "legacy.bsky.social"), ("createdAt", "2023-05-01T00:00:00Z"), ("x", "1")]
    )
    op[field] = value


def _extra_service(ctx: Ctx, op: dict[str, Any]) -> None:
    svc = op["services"][next(iter(op["services"]))]
    svc[ctx.rng.choice(["description", "priority", "id"])] = "primary"


def _missing_prev(ctx: Ctx, op: dict[str, Any]) -> None:
    del op["prev"]


def _aka_not_string(ctx: Ctx, op: dict[str, Any]) -> None:
    op["alsoKnownAs"].append(
        ctx.rng.choice([42, None, True, {"uri": "at://someone.example"}, ["at://x.example"]])
    )


def _unknown_type(ctx: Ctx, op: dict[str, Any]) -> None:
    op["type"] = ctx.rng.choice(["plc_update", "plc_operation_v2", "update", "PLC_OPERATION"])


def _nul(ctx: Ctx, op: dict[str, Any]) -> None:
    where = ctx.rng.randrange(3)
    if where == 0:
        op["alsoKnownAs"][0] = op["alsoKnownAs"][0] + "\x00"
    elif where == 1:
        op["alsoKnownAs"][0] = "at://nul\x00" + op["alsoKnownAs"][0][5:]
    else:
        svc = op["services"][next(iter(op["services"]))]
        svc["endpoint"] = svc["endpoint"] + "/\x00"


def _build_cid_mismatch(ctx: Ctx, st: DidState, hi: Hi) -> None:
    op, key = _head_update(ctx, st)
    seal(op, key)
    _add(ctx, st, _next_t(ctx, st, hi), op, ctx.random_cid(), "cid_mismatch")


def _build_duplicate(ctx: Ctx, st: DidState, hi: Hi) -> None:
    st.duplicates += 1  # written once the DID is complete (its final nullified flags are known)


def _always(ctx: Ctx, st: DidState, hi: Hi) -> bool:
    return True


def _kinds() -> dict[str, Kind]:
    hs_k_ok, hs_k = _high_s(K256)
    hs_p_ok, hs_p = _high_s(P256)
    kinds = [
        Kind("sig_high_s_k256", Reason.SIG_HIGH_S, hs_k_ok, hs_k),
        Kind("sig_high_s_p256", Reason.SIG_HIGH_S, hs_p_ok, hs_p),
        Kind(
            "sig_der",
            Reason.SIG_LENGTH,
            _on_head,
            _mangled("sig_der", lambda raw, r: encode_sig(der_encode(raw))),
        ),
        Kind("sig_empty", Reason.SIG_LENGTH, _on_head, _mangled("sig_empty", lambda raw, r: "")),
        Kind(
            "sig_padding",
            Reason.SIG_PADDING,
            _on_head,
            _mangled("sig_padding", lambda raw, r: encode_sig(raw) + "=="),
        ),
        Kind("sig_tail_bits", Reason.SIG_ENCODING, _on_head, _mangled("sig_tail_bits", _tail_bits)),
        Kind(
            "sig_newline",
            Reason.SIG_ENCODING,
            _on_head,
            _mangled("sig_newline", lambda raw, r: encode_sig(raw) + "\n"),
        ),
        Kind("sig_std_base64", Reason.SIG_ENCODING, _on_head, _build_std_b64),
        Kind("sig_wrong_key", Reason.SIG_INVALID, _on_head, _build_wrong_key),
        Kind("genesis_wrong_did", Reason.GENESIS_HASH, _pre_genesis_ok, _build_genesis_hash),
        Kind("genesis_unlisted_key", Reason.SIG_INVALID, _pre_genesis_ok, _build_genesis_bad_sig),
        Kind("tombstone_first", Reason.MISORDERED, _pre_genesis_ok, _build_tombstone_first),
        Kind("genesis_prev", Reason.GENESIS_PREV, _always, _build_genesis_prev),
        Kind(
            "prev_unknown",
            Reason.MISORDERED,
            lambda c, s, h: _room(s, h),
            _build_misordered("prev_unknown", lambda c, s: c.random_cid()),
        ),
        Kind(
            "prev_null",
            Reason.MISORDERED,
            lambda c, s, h: _room(s, h),
            _build_misordered("prev_null", lambda c, s: None),
        ),
        Kind(
            "prev_nullified",
            Reason.MISORDERED,
            lambda c, s, h: _room(s, h) and any(e.nullified for e in s.entries),
            _build_misordered("prev_nullified", _nullified_cid),
        ),
        Kind(
            "after_tombstone",
            Reason.MISORDERED,
            lambda c, s, h: _room(s, h) and s.head().tomb,
            _build_misordered("after_tombstone", lambda c, s: s.head().cid),
        ),
        Kind(
            "recovery_not_after_head",
            Reason.MISORDERED,
            lambda c, s, h: bool(s.fork_points()),
            _build_not_after_head,
        ),
        Kind(
            "fork_weak_key",
            Reason.SIG_INVALID,
            lambda c, s, h: _room(s, h) and len(s.live) >= 2,
            _build_fork_low,
        ),
        Kind("late_recovery", Reason.LATE_RECOVERY, lambda c, s, h: bool(_late_points(s, h)), _build_late),
        Kind("extra_field", Reason.INVALID_SHAPE, _on_head, _shaped("extra_field", _extra_top)),
        Kind(
            "service_extra_field",
            Reason.INVALID_SHAPE,
            _on_head,
            _shaped("service_extra_field", _extra_service),
        ),
        Kind("missing_prev", Reason.INVALID_SHAPE, _on_head, _shaped("missing_prev", _missing_prev)),
        Kind("aka_not_string", Reason.INVALID_SHAPE, _on_head, _shaped("aka_not_string", _aka_not_string)),
        Kind("unknown_type", Reason.INVALID_SHAPE, _on_head, _shaped("unknown_type", _unknown_type)),
        Kind("cid_mismatch", Reason.CID_MISMATCH, _on_head, _build_cid_mismatch),
        Kind("nul_character", Reason.NUL_CHARACTER, _on_head, _shaped("nul_character", _nul)),
        Kind("timestamp_not_after_prev", Reason.TIMESTAMP_ORDER, _ts_order_ok, _build_ts_order),
        Kind("duplicate", Reason.DUPLICATE, _always, _build_duplicate),
    ]
    return {k.name: k for k in kinds}


KINDS = _kinds()
KIND_NAMES = tuple(KINDS)
MAX_OWED_PER_SLOT = 2


def inject(ctx: Ctx, st: DidState, hi: Hi = None) -> None:
    """Add invalid ops after the DID's latest op: owed kinds first (each kind appears at least
    once per run), then a geometric number with mean rate/(1-rate), each of a random kind
    that fits the DID's state. `hi`: a createdAt the invalid ops must stay below."""
    rate = ctx.invalid_rate
    if rate <= 0:
        return
    owed = 0
    for name in list(ctx.pending):
        if owed == MAX_OWED_PER_SLOT:
            break
        kind = KINDS[name]
        if kind.applicable(ctx, st, hi):
            kind.build(ctx, st, hi)
            ctx.pending.remove(name)
            owed += 1
    while ctx.rng.random() < rate:
        options = [k for k in KINDS.values() if k.applicable(ctx, st, hi)]
        if not options:
            return
        ctx.rng.choice(options).build(ctx, st, hi)


def finish(ctx: Ctx, st: DidState) -> None:
    """Write the owed duplicate lines: exact copies of ops that stay non-nullified."""
    if not st.duplicates:
        return
    keep = [e for e in st.entries if not e.nullified]
    for _ in range(st.duplicates):
        e = ctx.rng.choice(keep)
        st.records.append(
            Record(e.t, e.cid, ctx.serial(), st.did, e.record.op_json, False, Reason.DUPLICATE, "duplicate")
        )


__all__ = ["KINDS", "KIND_NAMES", "Kind", "finish", "inject"]
