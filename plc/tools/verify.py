"""`plc verify`: replay audit logs and /export dumps and report every op that does not hold up.

Inputs are audit-log JSON arrays (the `/:did/log/audit` shape) and export JSONL in either line
format (legacy with `nullified`, sequenced with `seq`), plain, gzip or zstd, or `-` for stdin.
Every op is checked per DID, in input order, with the core chain engine in REPLAY mode; a DID's
state carries over from one file to the next. The report counts ops, DIDs, valid and rejected
ops (by reason, with the first few examples), input `nullified` flags that differ from the
computed final state, and malformed records (with file and line number).

Parallelism: with N workers (default: one per CPU) the DIDs are split by a stable hash
(zlib.crc32 of the DID text). For regular files every worker reads all inputs itself and keeps
only the lines of its DIDs (the DID is read with a byte search, before any parsing), so no line
crosses a process boundary; with stdin among the inputs the parent reads and sends batches of
raw lines to the owning worker. A DID always lives in one worker and its ops stay in order, so
the merged report is the same for any N.

Exit codes: 0 all valid, 1 anything rejected, malformed or with a differing nullified flag
(0 with --report-only), 2 usage errors (missing file, bad option), 3 a worker process died.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_mod
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from ._verify_inputs import STDIN, InputStream, Record, UsageError, check_paths, did_hint, input_size, records
from ._verify_replay import Partial, ShardVerifier

BATCH = 512  # records per message when the parent dispatches stdin lines to workers
POLL_S = 0.2


class Outcome(NamedTuple):
    """What happened to one well-formed op (only collected when asked for)."""

    file: str
    line: int
    entry: int | None  # position in an audit-log array; None for JSONL
    did: str
    cid: str
    valid: bool
    reason: str | None  # the core's Reason for a rejected op
    nullified: bool  # final computed state (False for a rejected op)


@dataclass
class Report:
    """The merged result of a verification run."""

    files: list[str]
    workers: int
    seconds: float
    records: int  # candidate records read (lines / array elements), malformed ones included
    ops: int  # well-formed records checked by the chain engine
    dids: int
    valid: int
    rejected: dict[str, int]  # reason -> count
    examples: dict[str, list[dict[str, Any]]]  # reason -> first few rejected ops
    nullified_mismatch: int
    nullified_examples: list[dict[str, Any]]
    malformed: int
    malformed_kinds: dict[str, int]
    malformed_examples: list[dict[str, Any]]
    outcomes: list[Outcome] | None = field(default=None, repr=False)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def ok(self) -> bool:
        return not (self.rejected_total or self.malformed or self.nullified_mismatch)

    def rejections(self) -> list[tuple[str, int, str]]:
        """(file, line, reason) of every rejected op; needs ``outcomes=True``."""
        if self.outcomes is None:
            raise ValueError("per-op outcomes were not collected (pass outcomes=True)")
        return [(o.file, o.line, o.reason or "") for o in self.outcomes if not o.valid]

    def to_json(self) -> dict[str, Any]:
        """The machine-readable report (`plc verify --json`)."""
        return {
            "ok": self.ok,
            "files": self.files,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "records": self.records,
            "ops": self.ops,
            "dids": self.dids,
            "valid": self.valid,
            "rejected": {
                "total": self.rejected_total,
                "by_reason": dict(sorted(self.rejected.items())),
                "examples": {k: self.examples.get(k, []) for k in sorted(self.rejected)},
            },
            "nullified_mismatch": {"total": self.nullified_mismatch, "examples": self.nullified_examples},
            "malformed": {
                "total": self.malformed,
                "by_kind": dict(sorted(self.malformed_kinds.items())),
                "examples": self.malformed_examples,
            },
        }

    def summary(self) -> str:
        """A human-readable summary."""
        rate = self.ops / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"{len(self.files)} input{'s' if len(self.files) != 1 else ''}: {self.ops} ops of {self.dids} DIDs "
            f"in {self.seconds:.2f} s ({rate:,.0f} ops/s, {self.workers} worker{'s' if self.workers != 1 else ''})",
            f"  valid:     {self.valid}",
            f"  rejected:  {self.rejected_total}",
        ]
        for reason, count in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"    {reason}: {count}")
            for ex in self.examples.get(reason, []):
                out.append(f"      {_where(ex)} {ex['did']} {ex['cid']}: {_clip(ex['message'])}")
        out.append(f"  nullified flags differing from the input: {self.nullified_mismatch}")
        for ex in self.nullified_examples:
            out.append(
                f"    {_where(ex)} {ex['did']} {ex['cid']}: input says nullified={str(ex['input_nullified']).lower()}, "
                f"replay gives {str(ex['computed_nullified']).lower()}"
            )
        out.append(f"  malformed records: {self.malformed}")
        for ex in self.malformed_examples:
            out.append(f"    {_where(ex)}: {_clip(ex['message'])}")
        if self.malformed > len(self.malformed_examples):
            out.append(f"    … and {self.malformed - len(self.malformed_examples)} more")
        out.append("OK" if self.ok else "FAILED")
        return "\n".join(out)


def _where(ex: dict[str, Any]) -> str:
    loc = f"{ex['file']}:{ex['line']}"
    if ex.get("entry") is not None:
        loc += f" (entry {ex['entry']})"
    return loc


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- sharding
def _slow_hint(raw: bytes) -> bytes | None:
    """The DID of a record whose text does not start with `{"did":"` (parsed in full)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is dict and type(obj.get("did")) is str:
        return obj["did"].encode("utf-8", "surrogatepass")
    return None


def owner_of(rec: Record, n: int) -> int:
    """The worker that owns a record: crc32 of its DID mod n; records without one go to 0."""
    raw = rec[2]
    if raw is None:
        return 0
    h = did_hint(raw)
    if h is None:
        h = _slow_hint(raw)
        if h is None:
            return 0
    return zlib.crc32(h) % n


def _shard_records(stream: InputStream, shard: int, n: int) -> Iterator[Record]:
    crc32 = zlib.crc32
    hint = did_hint
    for rec in records(stream):
        raw = rec[2]
        if raw is None:
            if shard == 0:
                yield rec
            continue
        h = hint(raw)
        if h is not None:
            if crc32(h) % n == shard:
                yield rec
        elif owner_of(rec, n) == shard:
            yield rec


# ----------------------------------------------------------------------------- progress
class _Progress:
    """A tqdm bar on stderr in raw input bytes, with the op count as a postfix.

    The bar is made on the first update, so worker processes are forked before tqdm starts
    its monitor thread.
    """

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled = enabled
        self.total = total
        self.bar: Any = None
        self._last_ops = -1

    def show(self, nbytes: int, ops: int) -> None:
        if not self.enabled:
            return
        bar = self.bar
        if bar is None:
            from tqdm import tqdm

            bar = self.bar = tqdm(
                total=self.total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="verify",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
        if nbytes > bar.n:
            bar.update(nbytes - bar.n)
        if ops != self._last_ops:
            self._last_ops = ops
            bar.set_postfix_str(f"{ops:,} ops", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- runners
def _replay_files(
    sv: ShardVerifier,
    paths: list[str],
    select: Callable[[InputStream], Iterable[Any]],
    report: Callable[[int, int], None] | None,
) -> int:
    """Feed every input file, in order, through one shard verifier; `select` picks the
    records this process owns; `report(bytes consumed so far, ops checked)` shows progress.
    Returns the bytes consumed."""
    done = 0
    for fidx, path in enumerate(paths):
        stream = InputStream(path)
        base = done

        def tick(ops: int, stream: InputStream = stream, base: int = base) -> None:
            report(base + stream.consumed, ops)  # type: ignore[misc]

        sv.run(fidx, select(stream), tick if report is not None else None)
        done += stream.consumed
    return done


def _run_inline(paths: list[str], keep: bool, prog: _Progress) -> Partial:
    sv = ShardVerifier(paths, keep_outcomes=keep)
    _replay_files(sv, paths, records, prog.show if prog.enabled else None)
    return sv.finish()


def _worker_files(paths: list[str], shard: int, n: int, keep: bool, counters: Any, results: Any) -> None:
    """Worker: read every input, keep the records of this shard's DIDs."""
    try:
        sv = ShardVerifier(paths, keep_outcomes=keep)

        def report(consumed: int, ops: int) -> None:
            counters[2 * shard] = consumed
            counters[2 * shard + 1] = ops

        done = _replay_files(sv, paths, lambda stream: _shard_records(stream, shard, n), report)
        counters[2 * shard] = done
        results.put((shard, sv.finish(), None))
    except KeyboardInterrupt:
        return
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put((shard, None, traceback.format_exc()))
    _exit_fast(results)


def _worker_queue(paths: list[str], shard: int, keep: bool, counters: Any, inbox: Any, results: Any) -> None:
    """Worker: check the batches of records the parent sends, until None."""
    try:
        sv = ShardVerifier(paths, keep_outcomes=keep)

        def tick(ops: int) -> None:
            counters[2 * shard + 1] = ops

        while True:
            item = inbox.get()
            if item is None:
                break
            fidx, batch = item
            sv.run(fidx, batch, tick)
        results.put((shard, sv.finish(), None))
    except KeyboardInterrupt:
        return
    except BaseException:  # noqa: BLE001
        results.put((shard, None, traceback.format_exc()))
    _exit_fast(results)


def _exit_fast(results: Any) -> None:
    """End a worker once its result is flushed, without tearing down its (large) DID state."""
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class WorkerFailed(RuntimeError):
    """A worker process died or raised; carries its traceback."""


def _mp_context() -> Any:
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


def _collect(procs: list[Any], results: Any, n: int, on_poll: Any) -> list[Partial]:
    """Wait for every worker's Partial; fail if one raised or died without sending one."""
    parts: dict[int, Partial] = {}
    grace = 0  # polls since a worker was first seen dead without a result
    while len(parts) < n:
        try:
            shard, part, err = results.get(timeout=POLL_S)
        except queue_mod.Empty:
            on_poll()
            dead = [k for k, p in enumerate(procs) if k not in parts and not p.is_alive()]
            if dead:
                grace += 1  # its result may still be in the pipe: give it a few more polls
                if grace > 10:
                    k = dead[0]
                    raise WorkerFailed(f"worker {k} exited (code {procs[k].exitcode}) without a result") from None
            continue
        if err is not None:
            raise WorkerFailed(f"worker {shard} failed:\n{err}")
        parts[shard] = part
        on_poll()
    return [parts[k] for k in range(n)]


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)


def _run_sharded(paths: list[str], n: int, keep: bool, prog: _Progress) -> list[Partial]:
    ctx = _mp_context()
    counters = ctx.Array("q", 2 * n, lock=False)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_files, args=(paths, k, n, keep, counters, results), daemon=True) for k in range(n)
    ]
    for p in procs:
        p.start()
    try:

        def poll() -> None:
            prog.show(min(counters[2 * k] for k in range(n)), sum(counters[2 * k + 1] for k in range(n)))

        parts = _collect(procs, results, n, poll)
        for p in procs:
            p.join()
        return parts
    finally:
        _stop(procs)


def _put(q: Any, item: Any, proc: Any) -> None:
    while True:
        try:
            q.put(item, timeout=POLL_S)
            return
        except queue_mod.Full:
            if not proc.is_alive():
                raise WorkerFailed(f"worker exited with code {proc.exitcode}") from None


def _run_dispatch(paths: list[str], n: int, keep: bool, prog: _Progress) -> list[Partial]:
    ctx = _mp_context()
    counters = ctx.Array("q", 2 * n, lock=False)
    results = ctx.Queue()
    inboxes = [ctx.Queue(maxsize=32) for _ in range(n)]
    procs = [
        ctx.Process(target=_worker_queue, args=(paths, k, keep, counters, inboxes[k], results), daemon=True)
        for k in range(n)
    ]
    for p in procs:
        p.start()

    def ops_done() -> int:
        return sum(counters[2 * k + 1] for k in range(n))

    try:
        done = 0
        for fidx, path in enumerate(paths):
            stream = InputStream(path)
            batches: list[list[tuple]] = [[] for _ in range(n)]
            count = 0
            for rec in records(stream):
                k = owner_of(rec, n)
                b = batches[k]
                b.append(rec)
                if len(b) >= BATCH:
                    _put(inboxes[k], (fidx, b), procs[k])
                    batches[k] = []
                count += 1
                if not count & 1023:
                    prog.show(done + stream.consumed, ops_done())
            for k, b in enumerate(batches):
                if b:
                    _put(inboxes[k], (fidx, b), procs[k])
            done += stream.consumed
        for k in range(n):
            _put(inboxes[k], None, procs[k])
        parts = _collect(procs, results, n, lambda: prog.show(done, ops_done()))
        for p in procs:
            p.join()
        return parts
    finally:
        _stop(procs)


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask), else the CPU count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def verify_paths(
    paths: Sequence[str | os.PathLike[str]],
    workers: int | None = None,
    progress: bool = False,
    *,
    outcomes: bool = False,
) -> Report:
    """Verify the given inputs in order; return the merged report.

    ``workers``: number of processes (default: usable CPUs; 1 runs in this process).
    ``progress``: show a tqdm bar on stderr. ``outcomes``: also return one Outcome per
    well-formed op (for comparing with a generator's truth file).
    Raises UsageError for a path that cannot be read at all.
    """
    names = [os.fspath(p) for p in paths]
    check_paths(names)
    n = default_workers() if workers is None else workers
    if n < 1:
        raise UsageError(f"--workers must be at least 1, not {n}")
    sizes = [input_size(p) for p in names]
    total = None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)
    t0 = time.perf_counter()
    prog = _Progress(progress, total)
    try:
        if n == 1:
            merged = _run_inline(names, outcomes, prog)
        else:
            parts = (_run_dispatch if STDIN in names else _run_sharded)(names, n, outcomes, prog)
            merged = Partial()
            if outcomes:
                merged.outcomes = []
            for part in parts:
                merged.merge(part)
    finally:
        prog.close()
    seconds = time.perf_counter() - t0
    return Report(
        files=names,
        workers=n,
        seconds=seconds,
        records=merged.records,
        ops=merged.ops,
        dids=merged.dids,
        valid=merged.valid,
        rejected=dict(merged.rejected),
        examples={k: [ex for _, ex in v] for k, v in merged.examples.items()},
        nullified_mismatch=merged.mismatch,
        nullified_examples=[ex for _, ex in merged.mismatch_examples],
        malformed=merged.malformed,
        malformed_kinds=dict(merged.malformed_kinds),
        malformed_examples=[ex for _, ex in merged.malformed_examples],
        outcomes=None
        if merged.outcomes is None
        else [Outcome(names[o[0]], *o[1:]) for o in merged.outcomes],
    )


# ----------------------------------------------------------------------------- CLI
def _workers_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def register(sub: Any) -> None:
    """Add the `verify` subcommand to the `plc` parser."""
    p = sub.add_parser(
        "verify",
        help="replay audit logs / export dumps and report invalid ops",
        description=(
            "Verify did:plc operations: audit-log JSON arrays and /export JSONL (legacy or sequenced "
            "lines), plain, .gz or .zst; '-' reads stdin. A DID's state carries across files, in "
            "the order given. Exit 0 if everything is valid, 1 if anything is rejected, malformed or "
            "has a nullified flag that differs from the replay, 2 on usage errors, 3 if a worker dies."
        ),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="input file, or - for stdin")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--report-only", action="store_true", help="exit 0 even when something is invalid")
    p.add_argument(
        "--workers", type=_workers_arg, default=None, metavar="N", help="processes to use (default: one per usable CPU; 1 = no subprocesses)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The `plc verify` command: returns the exit code."""
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        report = verify_paths(args.paths, workers=args.workers, progress=progress)
    except UsageError as exc:
        print(f"plc verify: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:
        print(f"plc verify: internal error: {exc}", file=sys.stderr)
        return 3
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
        sys.stdout.flush()
    else:
        print(report.summary())
    if args.report_only:
        return 0
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run `verify` alone (python -m plc.tools.verify …)."""
    parser = argparse.ArgumentParser(prog="plc")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["verify", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Report", "Outcome", "UsageError", "WorkerFailed", "verify_paths", "register", "run", "owner_of"]
