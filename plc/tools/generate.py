"""`plc generate`: a deterministic synthetic did:plc directory, as /export JSONL plus its truth.

The output looks like the real directory: most DIDs share a few PDS rotation keys, some hold
their own k256 or P-256 keys, and histories carry handle changes, PDS migrations, key
rotations, recoveries (inside the 72 h window, at exactly 72 h, repeated), tombstones (some
nullified), legacy `create` genesis ops, key-order traps, empty and duplicated rotation keys.
A configurable share of ops is invalid, of every kind a replaying verifier must reject
(see `_gen_invalid.KINDS`); each kind appears at least once when the rate is above zero and
the corpus has a dozen DIDs or more (P-256 high-S needs a P-256 share above zero). Keys and
signatures are real and deterministic: the same seed gives byte-identical files.

Lines are ordered like /export: by (createdAt, cid), seq 1, 2, 3, … in that order (with rare
gaps, as upstream has). Next to PATH goes PATH.truth.jsonl: for each line, whether a replaying
verifier must accept it, the core's `Reason` if not, and its final `nullified` flag (the
legacy line's own `nullified` field always equals it).

`--dids` counts DIDs with a valid genesis; a genesis with a non-null prev lives under the DID
it hashes to, so each such invalid op adds a DID of its own. A duplicate is the same op again
right after the original: a byte-identical line in the legacy format, the same line with its
own seq in the sequenced format (a seq is never reused).
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from ..core.jsonfmt import dumps, format_ms, parse_ms
from ._gen_history import build_did, random_plan, showcase_plans
from ._gen_invalid import KIND_NAMES, KINDS
from ._gen_model import MEAN_DID_GAP_MS, PRE_GENESIS_MS, Ctx, Record

FORMATS = ("sequenced", "legacy")
DEFAULT_START = "2023-01-01T00:00:00.000Z"
DEFAULT_START_MS = parse_ms(DEFAULT_START)
SEQ_GAP_P = 0.002  # the real sequence has gaps; so does ours, rarely

# heap item: (createdAt, cid, serial, did, op json, valid, reason, nullified, kind)
_Item = tuple[int, str, int, str, bytes, bool, "str | None", bool, str]


def generate(
    seed: int,
    dids: int,
    *,
    fmt: str = "sequenced",
    invalid_rate: float = 0.02,
    p256_share: float = 0.1,
    start_ms: int = DEFAULT_START_MS,
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Yield (line without newline, truth) for every line of the synthetic export, in order.

    Raises ValueError for an unknown format or out-of-range numbers, TypeError for a seed or
    DID count that is not an integer.
    """
    for line, truth, _kind in generate_with_kinds(
        seed, dids, fmt=fmt, invalid_rate=invalid_rate, p256_share=p256_share, start_ms=start_ms
    ):
        yield line, truth


def generate_with_kinds(
    seed: int,
    dids: int,
    *,
    fmt: str = "sequenced",
    invalid_rate: float = 0.02,
    p256_share: float = 0.1,
    start_ms: int = DEFAULT_START_MS,
    on_did: Callable[[], None] | None = None,
) -> Iterator[tuple[bytes, dict[str, Any], str]]:
    """Like `generate`, with the generator's name for what each line is (`KINDS` names for
    invalid lines, e.g. "sig_der"; "genesis", "handle_change", "recovery_72h", … for valid
    ones). `on_did` is called after each DID's history is built (progress)."""
    _check_options(seed, dids, fmt, invalid_rate, p256_share, start_ms)
    ctx = Ctx(seed, invalid_rate=invalid_rate, p256_share=p256_share, start_ms=start_ms)
    if invalid_rate > 0:
        ctx.pending = [k for k in KIND_NAMES if p256_share > 0 or k != "sig_high_s_p256"]
    showcase = showcase_plans(p256_share)
    gaps = random.Random(f"plc-generate/{seed}/seq")
    heap: list[_Item] = []
    seq = 0
    line_no = 0
    legacy = fmt == "legacy"
    t0 = start_ms

    def emit(item: _Item) -> tuple[bytes, dict[str, Any], str]:
        nonlocal seq, line_no
        t, cid, _, did, op_json, valid, reason, nullified, kind = item
        line_no += 1
        seq += 1 + (gaps.randint(1, 3) if gaps.random() < SEQ_GAP_P else 0)
        op = orjson.Fragment(op_json)
        if legacy:
            obj: dict[str, Any] = {
                "did": did,
                "cid": cid,
                "createdAt": format_ms(t),
                "operation": op,
                "nullified": nullified,
            }
        else:
            obj = {
                "did": did,
                "cid": cid,
                "seq": seq,
                "createdAt": format_ms(t),
                "operation": op,
                "type": "sequenced_op",
            }
        truth = {
            "line": line_no,
            "did": did,
            "cid": cid,
            "valid": valid,
            "reason": reason,
            "nullified": nullified,
        }
        return dumps(obj), truth, kind

    for i in range(dids):
        plan = showcase[i] if i < len(showcase) else random_plan(ctx)
        st = build_did(ctx, t0, plan)
        for rec in st.records:
            heapq.heappush(heap, _item(rec))
        for rec in ctx.extra:
            heapq.heappush(heap, _item(rec))
        ctx.extra.clear()
        if on_did is not None:
            on_did()
        t0 += max(1, int(ctx.rng.expovariate(1 / MEAN_DID_GAP_MS)))
        # every later DID's ops are at or after t0 - PRE_GENESIS_MS: what sorts before is final
        safe = t0 - PRE_GENESIS_MS
        while heap and heap[0][0] < safe:
            yield emit(heapq.heappop(heap))
    while heap:
        yield emit(heapq.heappop(heap))


def _item(rec: Record) -> _Item:
    nullified = rec.entry.nullified if rec.entry is not None else False
    return (rec.t, rec.cid, rec.serial, rec.did, rec.op_json, rec.valid, rec.reason, nullified, rec.kind)


def _check_options(
    seed: int, dids: int, fmt: str, invalid_rate: float, p256_share: float, start_ms: int
) -> None:
    if not isinstance(seed, int) or not isinstance(dids, int):
        raise TypeError("seed and dids must be integers")
    if dids < 0:
        raise ValueError("dids must not be negative")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if not 0 <= invalid_rate < 1:
        raise ValueError("invalid rate must be at least 0 and below 1")
    if not 0 <= p256_share <= 1:
        raise ValueError("P-256 share must be between 0 and 1")
    if not 0 <= start_ms < parse_ms("9000-01-01T00:00:00Z"):
        raise ValueError("start must be a time between 1970 and 9000")


# ----------------------------------------------------------------------------- CLI
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _count(text: str) -> int:
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _fraction(upper_open: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (0 <= x < 1 if upper_open else 0 <= x <= 1):
            raise argparse.ArgumentTypeError(f"must be in [0, 1{')' if upper_open else ']'}, got {text}")
        return x

    return parse


def _timestamp(text: str) -> int:
    try:
        ms = parse_ms(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 UTC timestamp: {text!r}") from None
    if ms < 0:
        raise argparse.ArgumentTypeError(f"must not be before 1970: {text!r}")
    return ms


def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="write a deterministic synthetic export (JSONL) and its truth file",
        description=(
            "Write a synthetic did:plc directory as /export JSONL to PATH, and the expected "
            "verdict for every line to PATH.truth.jsonl. The same seed gives the same bytes."
        ),
    )
    p.add_argument("--seed", type=_int, required=True, help="RNG seed (any integer)")
    p.add_argument("--dids", type=_count, required=True, help="number of DIDs with a valid genesis")
    p.add_argument(
        "--out", required=True, metavar="PATH", help="output file; the truth goes to PATH.truth.jsonl"
    )
    p.add_argument(
        "--format", choices=FORMATS, default="sequenced", help="export line format (default: sequenced)"
    )
    p.add_argument(
        "--invalid-rate",
        type=_fraction(True),
        default=0.02,
        help="share of invalid ops, in [0, 1) (default: 0.02)",
    )
    p.add_argument(
        "--p256-share",
        type=_fraction(False),
        default=0.1,
        help="share of DIDs holding their own P-256 key (default: 0.1)",
    )
    p.add_argument(
        "--start",
        type=_timestamp,
        default=DEFAULT_START_MS,
        help=f"first createdAt (default: {DEFAULT_START})",
    )

    def error(message: str) -> None:
        print(f"plc generate: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    p.error = error  # type: ignore[method-assign]  # one line, no usage dump
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write PATH and PATH.truth.jsonl (via temporary files, renamed when complete)."""
    out = Path(args.out)
    truth_path = Path(str(out) + ".truth.jsonl")
    if out.is_dir():
        return _fail(f"{out} is a directory")
    if not out.parent.is_dir():
        return _fail(f"directory {out.parent} does not exist")
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_truth = truth_path.with_name(truth_path.name + ".tmp")

    from tqdm import tqdm

    bar = tqdm(total=args.dids, unit="did", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
    counts = {"lines": 0, "invalid": 0, "dids": set()}  # type: dict[str, Any]
    try:
        with open(tmp_out, "wb") as f, open(tmp_truth, "wb") as g:
            for line, truth, _ in generate_with_kinds(
                args.seed,
                args.dids,
                fmt=args.format,
                invalid_rate=args.invalid_rate,
                p256_share=args.p256_share,
                start_ms=args.start,
                on_did=lambda: bar.update(1),
            ):
                f.write(line + b"\n")
                g.write(dumps(truth) + b"\n")
                counts["lines"] += 1
                counts["invalid"] += not truth["valid"]
                counts["dids"].add(truth["did"])
        os.replace(tmp_out, out)
        os.replace(tmp_truth, truth_path)
    except OSError as exc:
        for tmp in (tmp_out, tmp_truth):
            try:
                tmp.unlink()
            except OSError:
                pass
        return _fail(f"cannot write {exc.filename or out}: {exc.strerror or exc}")
    finally:
        bar.close()
    print(
        f"wrote {counts['lines']} ops ({counts['lines'] - counts['invalid']} valid, {counts['invalid']} invalid) "
        f"for {len(counts['dids'])} DIDs to {out} (truth: {truth_path})"
    )
    return 0


def _fail(message: str) -> int:
    print(f"plc generate: error: {message}", file=sys.stderr)
    return 1


__all__ = ["DEFAULT_START_MS", "FORMATS", "KINDS", "generate", "generate_with_kinds", "register", "run"]
