"""Valid histories of the synthetic directory: one DID at a time, genesis then events.

A plan says how a DID starts (legacy `create` or `plc_operation`, which rotation keys) and what
happens to it later: handle changes, PDS migrations, signing-key and rotation-key changes,
key-order traps, duplicate or empty rotation keys, tombstones, and recoveries (inside the
72 h window, at exactly 72 h, repeated, nullifying several ops or a tombstone). After every
valid op, `inject` may add invalid ops. The first few DIDs follow fixed showcase plans so that
every feature shows up even in a small corpus; the rest are drawn at random.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.encoding import did_for_cbor
from ..core.signatures import SigningKey
from ._gen_invalid import finish, inject
from ._gen_model import (
    DAY_MS,
    HOUR_MS,
    K256,
    MINUTE_MS,
    P256,
    SECOND_MS,
    WINDOW_MS,
    Ctx,
    DidState,
    Entry,
    Record,
    distinct_held,
    first_index,
    make_doc,
    pds_services,
    plc_op,
    render,
    seal,
    usual_key,
    with_handle,
)


@dataclass(frozen=True, slots=True)
class Plan:
    legacy: bool
    roles: tuple[str, ...]  # rotation keys by role: "pds", "user", "user2", "p256" (repeats = duplicates)
    events: tuple[str, ...]


# ----------------------------------------------------------------------------- bookkeeping
def commit(
    ctx: Ctx,
    st: DidState,
    op: dict[str, Any],
    cid: str,
    t: int,
    *,
    parent: int | None,
    key: SigningKey | None,
    kind: str,
) -> Entry:
    """Record a valid op; `parent` is the index of its prev in `st.live` (None: genesis).

    The asserts state what makes the op valid (spec §4.2); they check the generator's aim.
    """
    signer = -1
    if parent is not None:
        p = st.live[parent]
        assert key is not None and not p.tomb
        signer = first_index(p.keys, key.did_key)
        discarded = st.live[parent + 1 :]
        if discarded:
            assert signer < discarded[0].signer and t > st.live[-1].t and t - discarded[0].t <= WINDOW_MS
            for e in discarded:
                e.nullified = True
            del st.live[parent + 1 :]
        else:
            assert t > p.t
    assert t > st.cursor or not st.entries
    typ = op["type"]
    if typ == "plc_operation":
        keys: tuple[str, ...] = tuple(op["rotationKeys"])
        doc: dict[str, Any] | None = {
            k: op[k] for k in ("rotationKeys", "verificationMethods", "alsoKnownAs", "services")
        }
    elif typ == "create":
        keys = (op["recoveryKey"], op["signingKey"])
        doc = make_doc(list(keys), op["signingKey"], ["at://" + op["handle"]], pds_services(op["service"]))
    else:
        keys, doc = (), None
    rec = Record(t, cid, ctx.serial(), st.did, render(op), True, None, kind)
    entry = Entry(cid, t, keys, signer, typ == "plc_tombstone", doc, rec)
    rec.entry = entry
    st.entries.append(entry)
    st.live.append(entry)
    st.records.append(rec)
    st.cursor = t
    return entry


def _update(
    ctx: Ctx,
    st: DidState,
    t: int,
    doc: dict[str, Any],
    kind: str,
    key: SigningKey | None = None,
    hi: int | None = None,
) -> Entry:
    """A routine update on the head, then a slot for invalid ops."""
    head = st.head()
    key = key or usual_key(ctx, st, head.keys)
    op = plc_op(doc, head.cid)
    _, cid = seal(op, key)
    e = commit(ctx, st, op, cid, t, parent=len(st.live) - 1, key=key, kind=kind)
    inject(ctx, st, hi)
    return e


def _later(ctx: Ctx, st: DidState, lo: int, hi: int) -> int:
    return st.cursor + ctx.loguniform(lo, hi)


# ----------------------------------------------------------------------------- genesis
def genesis(ctx: Ctx, t0: int, plan: Plan) -> DidState:
    rng = ctx.rng
    pds = 0 if plan.legacy else ctx.pick_pds()
    p256_user = "p256" in plan.roles
    vm = ctx.new_key(P256 if p256_user and rng.random() < 0.3 else K256)
    priv: dict[str, SigningKey] = {}
    handle = ctx.handle(pds)
    if plan.legacy:
        sk, rk = ctx.new_key(K256), ctx.new_key(K256)
        priv = {sk.did_key: sk, rk.did_key: rk}
        vm = sk
        op: dict[str, Any] = {
            "type": "create",
            "signingKey": sk.did_key,
            "recoveryKey": rk.did_key,
            "handle": handle,
            "service": "https://bsky.social",
            "prev": None,
        }
        key = sk
    else:
        by_role: dict[str, SigningKey] = {}
        for role in plan.roles:
            if role in by_role:
                continue
            if role == "pds":
                by_role[role] = ctx.pds[pds].key
            else:
                by_role[role] = k = ctx.new_key(P256 if role == "p256" else K256)
                priv[k.did_key] = k
        rot = [by_role[r].did_key for r in plan.roles]
        op = plc_op(make_doc(rot, vm.did_key, ["at://" + handle], pds_services(ctx.endpoint(pds))), None)
        key = by_role["pds"] if "pds" in by_role else by_role[plan.roles[-1]]
    signed, cid = seal(op, key)
    st = DidState(did_for_cbor(signed), t0, pds, vm, priv)
    commit(ctx, st, op, cid, t0, parent=None, key=None, kind="legacy_genesis" if plan.legacy else "genesis")
    inject(ctx, st)
    return st


# ----------------------------------------------------------------------------- routine events
def ev_handle(ctx: Ctx, st: DidState) -> bool:
    base = st.head().document()
    _update(
        ctx,
        st,
        _later(ctx, st, 5 * SECOND_MS, 45 * DAY_MS),
        with_handle(base, ctx.handle(st.pds)),
        "handle_change",
    )
    return True


def ev_upgrade(ctx: Ctx, st: DidState) -> bool:
    """A legacy DID's first plc_operation: the PDS key joins the recovery key."""
    doc = st.head().document()
    if st.head().record.kind != "legacy_genesis":
        return False
    rot = [doc["rotationKeys"][0], ctx.pds[0].key.did_key]
    _update(ctx, st, _later(ctx, st, MINUTE_MS, 60 * DAY_MS), {**doc, "rotationKeys": rot}, "legacy_upgrade")
    return True


def ev_migrate(ctx: Ctx, st: DidState) -> bool:
    """Move to another PDS: new endpoint, the new PDS's rotation key, a new signing key."""
    head = st.head()
    doc = head.document()
    key = usual_key(ctx, st, head.keys)
    old, new = ctx.pds[st.pds].key.did_key, ctx.pick_pds(exclude=st.pds)
    new_key = ctx.pds[new].key.did_key
    rot = [new_key if k == old else k for k in doc["rotationKeys"]]
    if old not in doc["rotationKeys"] and new_key not in rot:
        rot.append(new_key)
    st.vm = ctx.new_key(K256)
    services = dict(doc["services"])
    services["atproto_pds"] = {"type": "AtprotoPersonalDataServer", "endpoint": ctx.endpoint(new)}
    new_doc = {**doc, "rotationKeys": rot, "services": services}
    new_doc["verificationMethods"] = {**doc["verificationMethods"], "atproto": st.vm.did_key}
    if ctx.rng.random() < 0.5:
        new_doc = with_handle(new_doc, ctx.handle(new))
    st.pds = new
    _update(ctx, st, _later(ctx, st, HOUR_MS, 120 * DAY_MS), new_doc, "pds_migration", key=key)
    return True


def ev_vm_rotate(ctx: Ctx, st: DidState) -> bool:
    doc = st.head().document()
    st.vm = ctx.new_key(K256)
    new_doc = {**doc, "verificationMethods": {**doc["verificationMethods"], "atproto": st.vm.did_key}}
    _update(ctx, st, _later(ctx, st, MINUTE_MS, 90 * DAY_MS), new_doc, "signing_key_rotation")
    return True


def ev_add_recovery(ctx: Ctx, st: DidState) -> bool:
    """Add a user recovery key in front, or rotate the one already there."""
    doc = st.head().document()
    rot = list(doc["rotationKeys"])
    user = ctx.new_key(P256 if ctx.rng.random() < ctx.p256_share else K256)
    st.priv[user.did_key] = user
    if rot and rot[0] in st.priv and len(set(rot)) > 1:
        rot[0] = user.did_key
        kind = "rotation_key_rotation"
    else:
        rot.insert(0, user.did_key)
        kind = "recovery_key_added"
    _update(ctx, st, _later(ctx, st, 10 * MINUTE_MS, 30 * DAY_MS), {**doc, "rotationKeys": rot}, kind)
    return True


def ev_traps(ctx: Ctx, st: DidState) -> bool:
    """Integer-like and non-ASCII service and verification-method ids, odd aka text."""
    doc = st.head().document()
    services = dict(doc["services"])
    for sid in ctx.rng.sample(["2", "10", "é", "ab", "B", "0"], 4):
        services[sid] = {"type": "ExampleService", "endpoint": f"https://svc{len(services)}.example.com"}
    vms = dict(doc["verificationMethods"])
    for vid in ctx.rng.sample(["10", "2", "zz", "b", "é"], 3):
        vms[vid] = ctx.rng.choice(ctx.strangers).did_key
    aka = list(doc["alsoKnownAs"]) + [
        ctx.rng.choice(
            ["at://café.example", "at://ünï.example", "at://tab\there.example", "at://ctl\x1fx.example"]
        )
    ]
    _update(
        ctx,
        st,
        _later(ctx, st, MINUTE_MS, 30 * DAY_MS),
        {**doc, "services": services, "verificationMethods": vms, "alsoKnownAs": aka},
        "key_order_traps",
    )
    return True


def ev_dup_keys(ctx: Ctx, st: DidState) -> bool:
    doc = st.head().document()
    rot = list(doc["rotationKeys"])
    if not rot:
        return False
    rot = rot + [rot[0]] if len(rot) > 1 else rot * 2
    _update(
        ctx,
        st,
        _later(ctx, st, MINUTE_MS, 30 * DAY_MS),
        {**doc, "rotationKeys": rot},
        "duplicate_rotation_keys",
    )
    return True


def ev_freeze(ctx: Ctx, st: DidState) -> bool:
    doc = st.head().document()
    _update(
        ctx, st, _later(ctx, st, HOUR_MS, 60 * DAY_MS), {**doc, "rotationKeys": []}, "empty_rotation_keys"
    )
    return True


def _tombstone(ctx: Ctx, st: DidState, t: int, key: SigningKey, hi: int | None) -> Entry:
    op: dict[str, Any] = {"type": "plc_tombstone", "prev": st.head().cid}
    _, cid = seal(op, key)
    e = commit(ctx, st, op, cid, t, parent=len(st.live) - 1, key=key, kind="tombstone")
    inject(ctx, st, hi)
    return e


def ev_tombstone_final(ctx: Ctx, st: DidState) -> bool:
    """A tombstone signed by the top key: nothing can undo it."""
    held = distinct_held(ctx, st, st.head().keys)
    if not held or held[0][0] != 0:
        return False
    _tombstone(ctx, st, _later(ctx, st, HOUR_MS, 180 * DAY_MS), held[0][1], None)
    return True


# ----------------------------------------------------------------------------- recoveries
def _recovery(
    ctx: Ctx, st: DidState, *, exact: bool = False, multi: bool = False, repeat: bool = False, tomb: str = ""
) -> bool:
    """A low-priority key changes the DID (or tombstones it); a higher one undoes it in time.

    tomb: "" (no tombstone), "recovered" (the tombstone is nullified), "maybe" (half the time).
    repeat: a second, still higher key overrides the first recovery too.
    """
    rng = ctx.rng
    pi = len(st.live) - 1
    parent = st.live[pi]
    held = distinct_held(ctx, st, parent.keys)
    if len(held) < (3 if repeat else 2):
        return False
    low = held[-1][1]
    t1 = _later(ctx, st, HOUR_MS, 60 * DAY_MS)
    t_rec = t1 + (WINDOW_MS if exact else rng.randint(1, WINDOW_MS))
    if tomb:
        if tomb == "maybe" and rng.random() < 0.5:
            _tombstone(ctx, st, t1, low, None)  # stays deleted
            return True
        _tombstone(ctx, st, t1, low, t_rec)
    else:
        hijack = with_handle(parent.document(), ctx.handle(st.pds))
        hijack["services"] = pds_services("https://" + ctx.name() + ".example.org")
        if multi and t_rec - t1 >= 3:
            t2 = rng.randint(t1 + 1, min(t_rec - 1, t1 + WINDOW_MS // 2))
            _update(ctx, st, t1, hijack, "hijack", key=low, hi=t2)
            _update(ctx, st, t2, with_handle(hijack, ctx.handle(st.pds)), "hijack", key=low, hi=t_rec)
        else:
            _update(ctx, st, t1, hijack, "hijack", key=low, hi=t_rec)
    high = held[-2][1] if repeat else held[0][1]
    first = _restore(ctx, st, pi, t_rec, high, "recovery_72h" if exact else "recovery")
    if repeat:
        t_rec2 = first.t + rng.randint(1, WINDOW_MS)
        inject(ctx, st, t_rec2)
        _restore(ctx, st, pi, t_rec2, held[0][1], "recovery_repeated")
    inject(ctx, st)
    return True


def _restore(ctx: Ctx, st: DidState, parent: int, t: int, key: SigningKey, kind: str) -> Entry:
    """Fork from live[parent] with its own document: nullifies everything after it."""
    p = st.live[parent]
    op = plc_op(p.document(), p.cid)
    _, cid = seal(op, key)
    return commit(ctx, st, op, cid, t, parent=parent, key=key, kind=kind)


EVENTS: dict[str, Callable[[Ctx, DidState], bool]] = {
    "handle": ev_handle,
    "upgrade": ev_upgrade,
    "migrate": ev_migrate,
    "vm_rotate": ev_vm_rotate,
    "add_recovery": ev_add_recovery,
    "traps": ev_traps,
    "dup_keys": ev_dup_keys,
    "freeze": ev_freeze,
    "tombstone_final": ev_tombstone_final,
    "tombstone_low": lambda c, s: _recovery(c, s, tomb="maybe"),
    "tombstone_recovered": lambda c, s: _recovery(c, s, tomb="recovered"),
    "tombstone_kept": lambda c, s: _tombstone_kept(c, s),
    "recovery": lambda c, s: _recovery(c, s),
    "recovery_exact": lambda c, s: _recovery(c, s, exact=True),
    "recovery_multi": lambda c, s: _recovery(c, s, multi=True),
    "recovery_repeat": lambda c, s: _recovery(c, s, repeat=True),
}


def _tombstone_kept(ctx: Ctx, st: DidState) -> bool:
    """A tombstone by the lowest-priority key that nobody undoes."""
    held = distinct_held(ctx, st, st.head().keys)
    if not held:
        return False
    _tombstone(ctx, st, _later(ctx, st, HOUR_MS, 180 * DAY_MS), held[-1][1], None)
    return True


_WEIGHTS = {
    "handle": 0.40, "migrate": 0.17, "vm_rotate": 0.10, "add_recovery": 0.06, "traps": 0.025,
    "dup_keys": 0.01, "freeze": 0.004, "tombstone_final": 0.012, "tombstone_low": 0.015,
    "recovery": 0.06, "recovery_exact": 0.01, "recovery_multi": 0.01, "recovery_repeat": 0.008,
}  # fmt: skip
_EVENT_NAMES = list(_WEIGHTS)
_EVENT_WEIGHTS = list(_WEIGHTS.values())
CONTINUE_P = 0.66  # chance of one more event: mean ~1.9 events after genesis


def showcase_plans(p256_share: float) -> list[Plan]:
    """Fixed plans for the first DIDs: every feature at least once in a small corpus."""
    p256 = ("p256", "pds") if p256_share > 0 else ("user", "pds")
    return [
        Plan(False, ("user", "pds"), ("handle", "recovery", "handle", "vm_rotate")),
        Plan(False, p256, ("migrate", "recovery_exact", "handle")),
        Plan(True, (), ("upgrade", "handle", "tombstone_recovered", "handle")),
        Plan(False, ("user", "user2", "pds"), ("handle", "recovery_repeat", "migrate")),
        Plan(False, ("pds",), ("traps", "handle", "tombstone_final")),
        Plan(False, ("pds", "pds"), ("handle", "freeze")),
        Plan(False, ("user", "pds", "user"), ("recovery_multi", "handle", "dup_keys")),
        Plan(False, ("user", "pds"), ("handle", "migrate", "add_recovery", "tombstone_kept")),
        Plan(False, ("pds",), ("handle", "add_recovery", "recovery", "traps")),
    ]


def random_plan(ctx: Ctx) -> Plan:
    rng = ctx.rng
    n = 0
    while n < 12 and rng.random() < CONTINUE_P:
        n += 1
    events = tuple(rng.choices(_EVENT_NAMES, weights=_EVENT_WEIGHTS, k=n))
    if rng.random() < 0.04:
        return Plan(True, (), ("upgrade",) + events)
    if rng.random() < ctx.p256_share:
        roles: tuple[str, ...] = ("p256", "pds") if rng.random() < 0.75 else ("p256",)
    else:
        v = rng.random()
        if v < 0.17:
            roles = ("user", "pds")
        elif v < 0.19:
            roles = ("user", "user2", "pds")
        elif v < 0.20:
            roles = ("pds", "pds")
        elif v < 0.205:
            roles = ("user", "pds", "user")
        else:
            roles = ("pds",)
    return Plan(False, roles, events)


def build_did(ctx: Ctx, t0: int, plan: Plan) -> DidState:
    """The complete history of one DID (valid ops and the invalid ones aimed at it)."""
    st = genesis(ctx, t0, plan)
    for name in plan.events:
        head = st.head()
        if head.tomb or not head.keys:
            break  # tombstoned or frozen: no valid op can follow
        if not EVENTS[name](ctx, st):
            ev_handle(ctx, st)
    finish(ctx, st)
    return st


__all__ = ["EVENTS", "Plan", "build_did", "random_plan", "showcase_plans"]
