"""The replay side of `plc verify`: check records against per-DID state, count what happens.

One ``ShardVerifier`` holds the state of the DIDs it owns (a whole run in one process, or one
hash shard of the DIDs in a worker). Every record is parsed with orjson, its envelope checked
(the legacy export / audit shape ``{did, cid, createdAt, operation, nullified}`` or the sequenced
export shape ``{did, cid, seq, createdAt, operation, type: "sequenced_op"}``), then the op goes
through ``plc.core.chain.check_op`` in REPLAY mode and, if accepted, ``DidLog.apply``.

The result is a ``Partial``: plain counts and examples that merge by addition and sorting, so
any split of the DIDs over workers gives the same merged report.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from ..core.chain import REPLAY, DidLog, check_op
from ..core.errors import OpError
from ..core.jsonfmt import parse_ms
from ._verify_inputs import Record

EXAMPLES_PER_REASON = 5
MALFORMED_EXAMPLES = 20
MISMATCH_EXAMPLES = 20

LEGACY_KEYS = frozenset(("did", "cid", "createdAt", "operation", "nullified"))
SEQUENCED_KEYS = frozenset(("did", "cid", "seq", "createdAt", "operation", "type"))
_ALL_KEYS = LEGACY_KEYS | SEQUENCED_KEYS

# reason for an op on which the core raised something other than OpError (a core bug)
INTERNAL_ERROR = "internal_error"

# the input's nullified flag, packed in the low 2 bits of a location reference
NO_FLAG, FLAG_FALSE, FLAG_TRUE = 0, 2, 3
_ENTRY_BITS = 22
_ENTRY_MASK = (1 << _ENTRY_BITS) - 1
_DROPPED: dict = {}


def unpack_ref(ref: int) -> tuple[int, int, int | None, int]:
    """(file index, line, array position or None, input flag) from the int the hot loop packs
    per accepted op: ((file << 40 | line) << 22 | position + 1) << 2 | flag."""
    flag = ref & 3
    ref >>= 2
    e = ref & _ENTRY_MASK
    ref >>= _ENTRY_BITS
    return ref >> 40, ref & ((1 << 40) - 1), (e - 1 if e else None), flag


class TrackedLog(DidLog):
    """A DidLog plus, per accepted entry, where it came from and the input's nullified flag."""

    __slots__ = ("refs",)

    def __init__(self, did: str) -> None:
        DidLog.__init__(self, did)
        self.refs: list[int] = []


class Partial:
    """Counts and examples of one shard; ``merge`` adds another shard's.

    Example lists hold (sort key, example dict) pairs; the sort key (file index, line, array
    position) makes "the first few" the same whatever the split over workers.
    """

    def __init__(self) -> None:
        self.records = 0  # candidate records seen (well-formed or not)
        self.ops = 0  # well-formed records checked by the chain engine
        self.dids = 0
        self.valid = 0
        self.rejected: dict[str, int] = {}
        self.examples: dict[str, list[tuple[tuple[int, int, int], dict[str, Any]]]] = {}
        self.mismatch = 0
        self.mismatch_examples: list[tuple[tuple[int, int, int], dict[str, Any]]] = []
        self.malformed = 0
        self.malformed_kinds: dict[str, int] = {}
        self.malformed_examples: list[tuple[tuple[int, ...], dict[str, Any]]] = []
        self.outcomes: list[tuple[int, int, int | None, str, str, bool, str | None, bool]] | None = None

    def merge(self, other: "Partial") -> None:
        self.records += other.records
        self.ops += other.ops
        self.dids += other.dids
        self.valid += other.valid
        for k, v in other.rejected.items():
            self.rejected[k] = self.rejected.get(k, 0) + v
        for k, v in other.examples.items():
            self.examples[k] = _first(self.examples.get(k, []) + v, EXAMPLES_PER_REASON)
        self.mismatch += other.mismatch
        self.mismatch_examples = _first(self.mismatch_examples + other.mismatch_examples, MISMATCH_EXAMPLES)
        self.malformed += other.malformed
        for k, v in other.malformed_kinds.items():
            self.malformed_kinds[k] = self.malformed_kinds.get(k, 0) + v
        self.malformed_examples = _first(self.malformed_examples + other.malformed_examples, MALFORMED_EXAMPLES)
        if other.outcomes is not None:
            self.outcomes = sorted((self.outcomes or []) + other.outcomes, key=_outcome_key)


def _first(items: list, n: int) -> list:
    items.sort(key=lambda p: p[0])
    return items[:n]


def _outcome_key(o: tuple) -> tuple[int, int, int]:
    return (o[0], o[1], -1 if o[2] is None else o[2])


def _describe_keys(rec: dict[str, Any]) -> str:
    keys = set(rec)
    shape = SEQUENCED_KEYS if ("seq" in keys or "type" in keys) else LEGACY_KEYS
    unknown = sorted(keys - _ALL_KEYS) or sorted(keys - shape)
    missing = sorted(shape - keys)
    parts = []
    if unknown:
        parts.append("unknown field" + ("s " if len(unknown) > 1 else " ") + ", ".join(map(repr, unknown)))
    if missing:
        parts.append("missing field" + ("s " if len(missing) > 1 else " ") + ", ".join(map(repr, missing)))
    return "; ".join(parts) or "fields of neither the audit/legacy nor the sequenced export shape"


class ShardVerifier:
    """Replays the records it is given, in order, for the DIDs it owns."""

    def __init__(self, files: list[str], *, keep_outcomes: bool = False) -> None:
        self.files = files
        self.logs: dict[str, TrackedLog] = {}
        self.suspects: set[str] = set()  # DIDs where a nullified flag may disagree at the end
        self.part = Partial()
        if keep_outcomes:
            self.part.outcomes = []

    # ------------------------------------------------------------------ reporting helpers
    def malformed(self, fidx: int, line: int, entry: int | None, kind: str, message: str) -> None:
        p = self.part
        p.malformed += 1
        p.malformed_kinds[kind] = p.malformed_kinds.get(kind, 0) + 1
        # records reach a shard in file order, so the first ones kept are the first ones seen
        if len(p.malformed_examples) < MALFORMED_EXAMPLES:
            # a broken stream is reported at the last line read, after that line's own problem
            p.malformed_examples.append(
                (
                    (fidx, line, -1 if entry is None else entry, 1 if kind == "stream" else 0),
                    {"file": self.files[fidx], "line": line, "entry": entry, "kind": kind, "message": message},
                )
            )

    def _rejected(self, fidx: int, line: int, entry: int | None, did: str, cid: str, err: OpError) -> None:
        p = self.part
        reason = err.reason
        p.rejected[reason] = p.rejected.get(reason, 0) + 1
        ex = p.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES_PER_REASON:
            ex.append(
                (
                    (fidx, line, -1 if entry is None else entry),
                    {
                        "file": self.files[fidx],
                        "line": line,
                        "entry": entry,
                        "did": did,
                        "cid": cid,
                        "status": err.status,
                        "message": err.detail,
                    },
                )
            )
        if p.outcomes is not None:
            p.outcomes.append((fidx, line, entry, did, cid, False, reason, False))

    # ------------------------------------------------------------------ the hot loop
    def run(self, fidx: int, recs: Iterable[Record], tick: Callable[[int], None] | None = None) -> None:
        """Check every record of file ``fidx`` (already filtered to this shard) in order.

        ``tick(ops)`` is called every 1024 records with the shard's op count, for progress.
        The cyclic garbage collector is paused meanwhile: the state only grows and holds no
        cycles, and the collector's repeated scans of it cost ~5-10 % of the time.
        """
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            self._run(fidx, recs, tick)
        finally:
            if gc_was_on:
                gc.enable()

    def _run(self, fidx: int, recs: Iterable[Record], tick: Callable[[int], None] | None) -> None:
        loads = orjson.loads
        JSONDecodeError = orjson.JSONDecodeError
        logs = self.logs
        suspects = self.suspects
        part = self.part
        malformed = self.malformed
        legacy_keys = LEGACY_KEYS
        sequenced_keys = SEQUENCED_KEYS
        n_records = 0
        valid = 0
        ops = 0
        fbase = fidx << 40
        for line, entry, raw, problem, kind in recs:
            n_records += 1
            if tick is not None and not n_records & 1023:
                tick(part.ops + ops)
            if raw is None:
                malformed(fidx, line, entry, kind or "input", problem or "unreadable")
                continue
            try:
                obj = loads(raw)
            except JSONDecodeError as exc:
                malformed(fidx, line, entry, "json", f"invalid JSON: {exc}")
                continue
            if type(obj) is not dict:
                malformed(fidx, line, entry, "not_object", f"not a JSON object but {type(obj).__name__}")
                continue
            keys = obj.keys()
            if keys == legacy_keys:
                flag = obj["nullified"]
                if flag is True:
                    flag = FLAG_TRUE
                elif flag is False:
                    flag = FLAG_FALSE
                else:
                    malformed(fidx, line, entry, "types", "'nullified' is not a boolean")
                    continue
            elif keys == sequenced_keys:
                if obj["type"] != "sequenced_op":
                    malformed(fidx, line, entry, "types", f"unknown line type {obj['type']!r} (expected 'sequenced_op')")
                    continue
                seq = obj["seq"]
                if type(seq) is not int or seq < 0:
                    malformed(fidx, line, entry, "types", "'seq' is not a non-negative integer")
                    continue
                flag = NO_FLAG
            else:
                malformed(fidx, line, entry, "fields", _describe_keys(obj))
                continue
            did = obj["did"]
            cid = obj["cid"]
            created = obj["createdAt"]
            if type(did) is not str or type(cid) is not str or type(created) is not str:
                bad = [k for k in ("did", "cid", "createdAt") if type(obj[k]) is not str]
                malformed(fidx, line, entry, "types", "not a string: " + ", ".join(map(repr, bad)))
                continue
            try:
                created_ms = parse_ms(created)
            except (ValueError, OverflowError):
                malformed(fidx, line, entry, "created_at", f"createdAt does not parse as a timestamp: {created!r}")
                continue
            ops += 1
            log = logs.get(did)
            if log is None:
                log = logs[did] = TrackedLog(did)
            try:
                acc = check_op(log, did, obj["operation"], mode=REPLAY, created_at=created_ms, cid=cid, raw=raw)
            except OpError as err:
                self._rejected(fidx, line, entry, did, cid, err)
                continue
            except Exception as exc:  # noqa: BLE001 - a core bug must not end the run with a traceback
                self._rejected(fidx, line, entry, did, cid, OpError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", 500))
                continue
            if acc.nullified or flag == FLAG_TRUE:
                suspects.add(did)
            # The engine never reads an accepted entry's op again (only its cid, createdAt, keys,
            # signer and tombstone flag), so the op dict is dropped: a fraction of the memory.
            log.apply(acc).op = _DROPPED
            e = entry + 1 if entry is not None and entry < _ENTRY_MASK else 0
            log.refs.append((((fbase | line) << _ENTRY_BITS | e) << 2) | flag)
            valid += 1
        part.records += n_records
        part.ops += ops
        part.valid += valid
        if tick is not None:
            tick(part.ops)

    # ------------------------------------------------------------------ end of input
    def finish(self) -> Partial:
        """Compare input nullified flags with the computed final state; return the counts."""
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            return self._finish()
        finally:
            if gc_was_on:
                gc.enable()

    def _finish(self) -> Partial:
        p = self.part
        p.dids = len(self.logs)
        keep = p.outcomes is not None
        names = self.logs if keep else sorted(self.suspects)
        found: list[tuple[tuple[int, int, int], str, str, bool]] = []
        for did in names:
            log = self.logs[did]
            for e, ref in zip(log.entries, log.refs):
                fidx, line, entry, flag = unpack_ref(ref)
                if keep:
                    p.outcomes.append((fidx, line, entry, did, e.cid, True, None, e.nullified))  # type: ignore[union-attr]
                if flag != NO_FLAG and (flag == FLAG_TRUE) != e.nullified:
                    found.append(((fidx, line, -1 if entry is None else entry), did, e.cid, e.nullified))
        p.mismatch = len(found)
        found.sort(key=lambda f: f[0])
        p.mismatch_examples = [
            (
                key,
                {
                    "file": self.files[key[0]],
                    "line": key[1],
                    "entry": None if key[2] < 0 else key[2],
                    "did": did,
                    "cid": cid,
                    "input_nullified": not nullified,
                    "computed_nullified": nullified,
                },
            )
            for key, did, cid, nullified in found[:MISMATCH_EXAMPLES]
        ]
        if keep:
            p.outcomes.sort(key=_outcome_key)  # type: ignore[union-attr]
        return p


__all__ = ["ShardVerifier", "Partial", "TrackedLog", "unpack_ref", "LEGACY_KEYS", "SEQUENCED_KEYS"]
