"""Building blocks of the synthetic-directory generator (`plc generate`).

What lives here: the per-run context (seeded RNG, the shared PDS keys, serial numbers), the
per-DID chain bookkeeping the generator keeps for itself (which ops are live, which key signed
each op, what got nullified), the output record of one line, op sealing (sign, CID) and the
names and handles that make the data look like the real directory.

Truth is never computed by the validator: every op is built with a known outcome, and the
bookkeeping here mirrors the rules of spec §4 only as far as the generator needs to aim ops.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.didkey import K256, P256
from ..core.encoding import cid_for_cbor, dag_cbor
from ..core.jsonfmt import dumps, op_order
from ..core.signatures import SigningKey, encode_sig

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
WINDOW_MS = 72 * HOUR_MS  # the recovery window (spec §4.2 6d); exactly this much is allowed
PRE_GENESIS_MS = 60_000  # the furthest an invalid op may sit before its DID's genesis
MEAN_DID_GAP_MS = 40_000  # mean time between two DID creations

PDS_SERVICE_TYPE = "AtprotoPersonalDataServer"
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

_MUSHROOMS = (
    "porcini", "morel", "shiitake", "enoki", "chanterelle", "oyster", "maitake", "lionsmane",
    "puffball", "amanita", "inkcap", "blewit", "truffle", "russula", "cordyceps", "hydnum",
)  # fmt: skip
_REGIONS = ("us-east", "us-west")
_ADJECTIVES = (
    "quiet", "bright", "lazy", "brave", "cosmic", "tiny", "wild", "sunny", "misty", "rapid",
    "gentle", "odd", "lucky", "solar", "velvet", "amber", "crimson", "silent", "happy", "polar",
)  # fmt: skip
_NOUNS = (
    "falcon", "otter", "river", "maple", "comet", "badger", "harbor", "lantern", "meadow", "pixel",
    "sparrow", "canyon", "ember", "willow", "quokka", "nebula", "pebble", "thistle", "walrus", "fjord",
)  # fmt: skip
_TLDS = ("com", "net", "dev", "xyz", "social", "blue", "org", "io")


@dataclass(frozen=True, slots=True)
class Pds:
    """A PDS: one k256 rotation key shared by every account it hosts, and its hostnames."""

    name: str
    key: SigningKey
    endpoints: tuple[str, ...]
    handle_suffix: str
    weight: float


@dataclass(slots=True)
class Record:
    """One output line in the making: where it sorts, what it holds and what it must give."""

    t: int  # createdAt, ms
    cid: str  # the cid as written in the line
    serial: int  # creation order: the last tiebreak, so sorting is total and stable
    did: str
    op_json: bytes  # the operation, jsonb/V8 key order, compact
    valid: bool
    reason: str | None
    kind: str  # what the generator meant to produce (for tests and reports)
    entry: Entry | None = None  # the chain entry of a valid op (its final nullified flag)


@dataclass(slots=True)
class Entry:
    """An op the generator knows a replaying verifier accepts."""

    cid: str
    t: int
    keys: tuple[str, ...]  # rotation keys that may sign a child (empty for a tombstone)
    signer: int  # first index of the signing key in the parent's keys (-1: genesis)
    tomb: bool
    doc: dict[str, Any] | None  # the plc_operation fields (normalised for a legacy create)
    record: Record
    nullified: bool = False

    def document(self) -> dict[str, Any]:
        """The op's fields. Only a tombstone has none, and nothing is built on a tombstone."""
        assert self.doc is not None
        return self.doc


@dataclass(slots=True)
class DidState:
    """The generator's own view of one DID's chain while its history is built."""

    did: str
    t0: int  # genesis createdAt
    pds: int  # index of the PDS that currently hosts it
    vm: SigningKey  # its atproto signing key (never a rotation key: signing with it is invalid)
    priv: dict[str, SigningKey] = field(default_factory=dict)  # its own rotation keys
    entries: list[Entry] = field(default_factory=list)
    live: list[Entry] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    cursor: int = 0  # the latest createdAt used so far; the next op of this DID comes later
    before_first_update: bool = True  # ops may still be placed before the genesis
    duplicates: int = 0  # duplicate lines to add once the final nullified flags are known

    def head(self) -> Entry:
        return self.live[-1]

    def base(self) -> Entry:
        """The newest live op that has a document (the head unless that is a tombstone)."""
        for e in reversed(self.live):
            if e.doc is not None:
                return e
        raise AssertionError("a live chain always starts with a genesis op")

    def fork_points(self) -> list[int]:
        """Indexes i in `live` where a higher-priority key could nullify live[i+1:]."""
        return [i for i in range(len(self.live) - 1) if self.live[i + 1].signer > 0]


class Ctx:
    """Everything one generator run shares: the seeded RNG, PDS keys, counters, options."""

    def __init__(self, seed: int, *, invalid_rate: float, p256_share: float, start_ms: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.invalid_rate = invalid_rate
        self.p256_share = p256_share
        self.start_ms = start_ms
        self._serial = 0
        self._keys = 0
        self.extra: list[Record] = []  # records of DIDs that only ever see invalid ops
        self.pending: list[str] = []  # invalid kinds still owed (each appears at least once)
        self.pds = self._make_pds()
        self.pds_by_key = {p.key.did_key: p.key for p in self.pds}
        # keys that are never anyone's rotation key: signing with them is never allowed
        self.strangers = [self.new_key(K256), self.new_key(K256), self.new_key(P256)]

    # -- keys, ids, times
    def new_key(self, curve: str) -> SigningKey:
        self._keys += 1
        return SigningKey.from_seed(curve, f"plc-generate/{self.seed}/{self._keys}".encode())

    def serial(self) -> int:
        self._serial += 1
        return self._serial

    def random_cid(self) -> str:
        return cid_for_cbor(self.rng.randbytes(32))

    def loguniform(self, lo: int, hi: int) -> int:
        return int(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def key_for(self, st: DidState, did_key: str) -> SigningKey | None:
        return st.priv.get(did_key) or self.pds_by_key.get(did_key)

    def held(self, st: DidState, did_key: str) -> SigningKey:
        """The private key of a rotation key the generator itself put in place."""
        key = self.key_for(st, did_key)
        assert key is not None
        return key

    # -- realistic names
    def _make_pds(self) -> list[Pds]:
        bsky_hosts = tuple(f"https://{m}.{r}.host.bsky.network" for m in _MUSHROOMS for r in _REGIONS)
        specs = [
            ("bsky", ("https://bsky.social",) + bsky_hosts, "bsky.social", 0.78),
            ("northwind", ("https://pds.northwind.social",), "northwind.social", 0.09),
            (
                "hearth",
                ("https://hearth.example.net", "https://eu.hearth.example.net"),
                "hearth.example.net",
                0.08,
            ),
            ("selfhost", ("https://pds.homelab.dev",), "homelab.dev", 0.05),
        ]
        return [Pds(n, self.new_key(K256), eps, suffix, w) for n, eps, suffix, w in specs]

    def pick_pds(self, exclude: int | None = None) -> int:
        choices = [i for i in range(len(self.pds)) if i != exclude]
        return self.rng.choices(choices, weights=[self.pds[i].weight for i in choices])[0]

    def endpoint(self, pds: int) -> str:
        eps = self.pds[pds].endpoints
        if pds == 0 and len(eps) > 1:
            return self.rng.choice(eps[1:])
        return self.rng.choice(eps)

    def name(self) -> str:
        r = self.rng
        n = r.choice(_ADJECTIVES) + r.choice(_NOUNS)
        return n + str(r.randrange(1000)) if r.random() < 0.6 else n

    def handle(self, pds: int) -> str:
        """A bare handle: mostly `name.<pds suffix>`, sometimes a custom domain."""
        if self.rng.random() < 0.12:
            return f"{self.name()}.{self.rng.choice(_TLDS)}"
        return f"{self.name()}.{self.pds[pds].handle_suffix}"


# ----------------------------------------------------------------------------- ops
def pds_services(endpoint: str) -> dict[str, Any]:
    return {"atproto_pds": {"type": PDS_SERVICE_TYPE, "endpoint": endpoint}}


def make_doc(
    rotation_keys: list[str], vm_key: str, aka: list[str], services: dict[str, Any]
) -> dict[str, Any]:
    return {
        "rotationKeys": rotation_keys,
        "verificationMethods": {"atproto": vm_key},
        "alsoKnownAs": aka,
        "services": services,
    }


def plc_op(doc: dict[str, Any], prev: str | None) -> dict[str, Any]:
    """An unsigned plc_operation with fresh containers (docs are shared, never mutated)."""
    return {
        "type": "plc_operation",
        "rotationKeys": list(doc["rotationKeys"]),
        "verificationMethods": dict(doc["verificationMethods"]),
        "alsoKnownAs": list(doc["alsoKnownAs"]),
        "services": {k: dict(v) for k, v in doc["services"].items()},
        "prev": prev,
    }


def with_handle(doc: dict[str, Any], handle: str) -> dict[str, Any]:
    """The doc with its first alsoKnownAs replaced."""
    aka = ["at://" + handle] + list(doc["alsoKnownAs"][1:])
    return {**doc, "alsoKnownAs": aka}


def seal(
    op: dict[str, Any], key: SigningKey, *, high_s: bool = False, mangle: Callable[[bytes], str] | None = None
) -> tuple[bytes, str]:
    """Sign `op` (in place: adds `sig`); returns (signed DAG-CBOR, computed CID).

    `mangle` turns the 64-byte signature into the `sig` text (default: strict base64url).
    """
    raw = key.sign_raw(dag_cbor(op), high_s=high_s)
    op["sig"] = encode_sig(raw) if mangle is None else mangle(raw)
    signed = dag_cbor(op)
    return signed, cid_for_cbor(signed)


def render(op: dict[str, Any]) -> bytes:
    """The op as plc.directory serves it: jsonb + V8 key order, compact JSON."""
    return dumps(op_order(op))


def usual_key(ctx: Ctx, st: DidState, keys: tuple[str, ...]) -> SigningKey:
    """The key that signs a routine update: the hosting PDS's key if it has authority, else
    the lowest-priority held key; a stranger when nobody does (a frozen DID)."""
    pds_key = ctx.pds[st.pds].key
    if pds_key.did_key in keys:
        return pds_key
    for k in reversed(keys):
        sk = ctx.key_for(st, k)
        if sk is not None:
            return sk
    return ctx.strangers[0]


def distinct_held(ctx: Ctx, st: DidState, keys: tuple[str, ...]) -> list[tuple[int, SigningKey]]:
    """(first index, key) for every distinct held key in `keys`, highest priority first."""
    out: list[tuple[int, SigningKey]] = []
    seen: list[str] = []
    for i, k in enumerate(keys):
        if k in seen:
            continue
        seen.append(k)
        sk = ctx.key_for(st, k)
        if sk is not None:
            out.append((i, sk))
    return out


def curve_keys(st: DidState, ctx: Ctx, keys: tuple[str, ...], curve: str) -> list[SigningKey]:
    """Held keys of one curve among `keys`, in list order."""
    out = []
    for k in keys:
        sk = ctx.key_for(st, k)
        if sk is not None and sk.curve == curve:
            out.append(sk)
    return out


def first_index(keys: tuple[str, ...], did_key: str) -> int:
    """Index at which a key first appears: the signer index a verifier records."""
    return keys.index(did_key)


__all__ = [
    "B64URL_ALPHABET",
    "DAY_MS",
    "HOUR_MS",
    "K256",
    "MEAN_DID_GAP_MS",
    "MINUTE_MS",
    "P256",
    "PRE_GENESIS_MS",
    "SECOND_MS",
    "WINDOW_MS",
    "Ctx",
    "DidState",
    "Entry",
    "Pds",
    "Record",
    "curve_keys",
    "distinct_held",
    "first_index",
    "make_doc",
    "pds_services",
    "plc_op",
    "render",
    "seal",
    "usual_key",
    "with_handle",
]  # fmt: skip
