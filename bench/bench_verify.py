"""Benchmark of `plc verify` against the raw ECDSA verify ceiling, measured in one run.

    .venv/bin/python bench/bench_verify.py [--ops 200000] [--p256-share 0.1] [--workers 1,2]

1. Raw verify rate per curve, with the verifier's own libraries, keys parsed in advance and the
   message prehashed: libsecp256k1 through coincurve (`lib.secp256k1_ecdsa_verify` on parsed
   signature and key) for k256, `cryptography` (`EllipticCurvePublicKey.verify` with
   `Prehashed(SHA256)`, DER made in advance) for P-256. Distinct keys and messages, best of 3
   rounds, one core; then the same loops in one process per core at once.
2. A corpus of at least --ops valid ops from `plc.tools.generate.generate` (invalid_rate 0).
3. The number of signature checks per curve that replaying this corpus needs (an op signed by a
   rotation key that is not the first one costs more than one check, in the reference too),
   counted in a separate pass with a counting wrapper around `verify_digest`.
4. `plc verify` end to end (a subprocess, wall clock) for each worker count.

The ceiling for the corpus is `ops / Σ_curve (checks_curve / raw_rate_curve)`: what the crypto
library alone would take for the same checks. The brief's mix-weighted form
`1 / (share_k256/rate_k256 + share_p256/rate_p256)` (one check per op, shares of ops by signing
curve) is printed too. Results are appended to docs/benchmarks.md unless --no-write.

Not a test: it takes about a minute and a half on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _machine import cpu_model
from _machine import ram as ram_size

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coincurve.context import GLOBAL_CONTEXT  # noqa: E402
from coincurve.ecdsa import deserialize_compact, lib  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, utils  # noqa: E402

from plc.core.didkey import K256, P256, parse_rotation_key  # noqa: E402
from plc.core.signatures import SigningKey  # noqa: E402

RAW_SECONDS = 1.5  # per round
RAW_ROUNDS = 3
N_KEYS = 16
N_MSGS = 2000


# ----------------------------------------------------------------------------- raw ceiling
def _raw_material(curve: str) -> list[tuple[object, bytes, object]]:
    """(parsed key, sha256 digest, parsed signature) for N_MSGS distinct messages."""
    keys = [SigningKey.from_seed(curve, f"bench-{curve}-{i}".encode()) for i in range(N_KEYS)]
    out = []
    for i in range(N_MSGS):
        sk = keys[i % N_KEYS]
        msg = f"raw verify ceiling message {i}".encode()
        sig = sk.sign_raw(msg)
        digest = hashlib.sha256(msg).digest()
        pk = parse_rotation_key(sk.did_key)
        assert pk is not None
        if curve == K256:
            out.append((pk.handle.public_key, digest, deserialize_compact(sig)))  # type: ignore[attr-defined]
        else:
            der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            out.append((pk.handle, digest, der))
    return out


def _raw_loop(curve: str, material: list, seconds: float) -> float:
    """Verifications per second over `seconds` (every result checked once, outside the clock)."""
    done = 0
    if curve == K256:
        verify = lib.secp256k1_ecdsa_verify
        ctx = GLOBAL_CONTEXT.ctx
        assert all(verify(ctx, s, d, k) == 1 for k, d, s in material)
        t0 = time.perf_counter()
        while True:
            for k, d, s in material:
                verify(ctx, s, d, k)
            done += len(material)
            el = time.perf_counter() - t0
            if el >= seconds:
                return done / el
    alg = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
    for k, d, s in material:
        k.verify(s, d, alg)  # raises if wrong
    t0 = time.perf_counter()
    while True:
        for k, d, s in material:
            k.verify(s, d, alg)
        done += len(material)
        el = time.perf_counter() - t0
        if el >= seconds:
            return done / el


def raw_rate(curve: str) -> float:
    material = _raw_material(curve)
    return max(_raw_loop(curve, material, RAW_SECONDS) for _ in range(RAW_ROUNDS))


def _raw_child(curve: str, seconds: float, out: "mp.Queue[float]") -> None:
    out.put(_raw_loop(curve, _raw_material(curve), seconds))


def raw_rate_parallel(curve: str, procs: int) -> float:
    """Sum of the rates of `procs` processes verifying at the same time."""
    ctx = mp.get_context("fork")
    q: "mp.Queue[float]" = ctx.Queue()
    ps = [ctx.Process(target=_raw_child, args=(curve, RAW_SECONDS * 2, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    rates = [q.get() for _ in ps]
    for p in ps:
        p.join()
    return sum(rates)


# ----------------------------------------------------------------------------- corpus
def build_corpus(path: Path, ops_wanted: int, seed: int, p256_share: float, fmt: str) -> tuple[int, int]:
    """Write at least `ops_wanted` valid ops; returns (ops, dids)."""
    from plc.tools.generate import generate

    dids = max(12, int(ops_wanted / 2.8))  # the generator gives about 3 ops per DID
    while True:
        n = 0
        with open(path, "wb") as f:
            for line, _truth in generate(seed, dids, fmt=fmt, invalid_rate=0.0, p256_share=p256_share):
                f.write(line)
                f.write(b"\n")
                n += 1
        if n >= ops_wanted:
            return n, dids
        dids = int(dids * ops_wanted / max(n, 1) * 1.05) + 1


def count_checks(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Signature checks per curve needed to replay the corpus, and ops per signing curve
    (the curve of the check that succeeded), from one pass with a counting `verify_digest`."""
    import plc.core.signatures as sigs
    from plc.tools.verify import verify_paths

    checks = {K256: 0, P256: 0}
    signed = {K256: 0, P256: 0}
    original = sigs.verify_digest

    def counting(key, digest, sig):  # type: ignore[no-untyped-def]
        checks[key.curve] += 1
        ok = original(key, digest, sig)
        if ok:
            signed[key.curve] += 1
        return ok

    sigs.verify_digest = counting  # type: ignore[assignment]
    try:
        report = verify_paths([str(path)], workers=1)
    finally:
        sigs.verify_digest = original  # type: ignore[assignment]
    if not report.ok:
        raise SystemExit(f"the corpus does not verify cleanly: {report.to_json()}")
    return checks, signed


# ----------------------------------------------------------------------------- end to end
def run_verify(path: Path, workers: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "plc", "verify", "--json", "--no-progress", "--workers", str(workers), str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"plc verify failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return wall, json.loads(proc.stdout)


# ----------------------------------------------------------------------------- machine
def machine() -> dict[str, str]:
    cpu, ram = cpu_model(), ram_size()
    import cryptography
    import orjson
    from cryptography.hazmat.backends.openssl.backend import backend

    def version(mod: object) -> str:
        return str(getattr(mod, "__version__", "?"))

    from importlib.metadata import version as dist_version

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libs": (
            f"coincurve {dist_version('coincurve')}, cryptography {version(cryptography)} "
            f"({backend.openssl_version_text()}), libipld {dist_version('libipld')}, orjson {version(orjson)}"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=200_000, help="minimum ops in the corpus (default 200000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--p256-share", type=float, default=0.1, help="generator's share of P-256 DIDs (default 0.1)")
    ap.add_argument("--format", choices=("sequenced", "legacy"), default="sequenced")
    ap.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1 and nproc)")
    ap.add_argument("--corpus", type=Path, default=None, help="keep the corpus at this path (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=1, help="end-to-end runs per worker count; the best is kept")
    ap.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    args = ap.parse_args(argv)
    ncpu = os.cpu_count() or 1
    worker_counts = [int(x) for x in args.workers.split(",")] if args.workers else sorted({1, ncpu})
    command = ".venv/bin/python bench/bench_verify.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    print(f"raw verify rate, 1 core ({RAW_ROUNDS} rounds of {RAW_SECONDS} s, best) …", flush=True)
    raw = {K256: raw_rate(K256), P256: raw_rate(P256)}
    print(f"  k256 {raw[K256]:,.0f}/s   p256 {raw[P256]:,.0f}/s", flush=True)
    raw_par = {}
    if ncpu > 1:
        raw_par = {c: raw_rate_parallel(c, ncpu) for c in (K256, P256)}
        print(f"  on {ncpu} processes at once: k256 {raw_par[K256]:,.0f}/s   p256 {raw_par[P256]:,.0f}/s")

    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        path = args.corpus or Path(tmp) / "corpus.jsonl"
        t0 = time.perf_counter()
        ops, dids = build_corpus(path, args.ops, args.seed, args.p256_share, args.format)
        gen_s = time.perf_counter() - t0
        size = path.stat().st_size
        print(f"corpus: {ops:,} ops of {dids:,} DIDs, {size / 2**20:.0f} MiB, generated in {gen_s:.1f} s", flush=True)

        checks, signers = count_checks(path)
        check_s = checks[K256] / raw[K256] + checks[P256] / raw[P256]
        ceiling = ops / check_s
        share_p = signers[P256] / ops
        brief_ceiling = 1 / ((1 - share_p) / raw[K256] + share_p / raw[P256])
        print(
            f"checks: k256 {checks[K256]:,}  p256 {checks[P256]:,}  ({(checks[K256] + checks[P256]) / ops:.3f} per op); "
            f"ops signed with p256: {share_p:.1%}"
        )
        print(f"ceiling for this corpus, 1 core: {ceiling:,.0f} ops/s (one-check-per-op form: {brief_ceiling:,.0f})")

        results = []
        for w in worker_counts:
            wall, rep = min((run_verify(path, w) for _ in range(max(1, args.repeat))), key=lambda r: r[0])
            assert rep["ops"] == ops and rep["valid"] == ops, rep
            rate = ops / wall
            results.append((w, wall, rep["seconds"], rate))
            print(
                f"plc verify --workers {w}: {wall:.2f} s wall ({rep['seconds']:.2f} s inside), {rate:,.0f} ops/s, "
                f"{rate / ceiling:.2f} of the 1-core ceiling",
                flush=True,
            )

    base = next((r for r in results if r[0] == 1), None)
    m = machine()
    lines = [
        "",
        f"## `plc verify` vs the raw verify ceiling — {started}",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM, Linux {m['kernel']}, Python {m['python']}",
        f"- Libraries: {m['libs']}",
        f"- Command: `{command}`",
        f"- Corpus: {ops:,} valid ops of {dids:,} DIDs ({args.format} export, {size / 2**20:.0f} MiB), "
        f"`generate(seed={args.seed}, p256_share={args.p256_share}, invalid_rate=0.0)`; "
        f"{share_p:.1%} of ops signed with a P-256 key; "
        f"{checks[K256]:,} k256 + {checks[P256]:,} P-256 signature checks "
        f"({(checks[K256] + checks[P256]) / ops:.3f} per op)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| raw k256 verify, 1 core | {raw[K256]:,.0f} /s ({1e6 / raw[K256]:.1f} µs) |",
        f"| raw P-256 verify, 1 core | {raw[P256]:,.0f} /s ({1e6 / raw[P256]:.1f} µs) |",
    ]
    if raw_par:
        lines.append(f"| raw k256 / P-256 verify, {ncpu} processes | {raw_par[K256]:,.0f} /s / {raw_par[P256]:,.0f} /s |")
    lines += [
        f"| ceiling for this corpus, 1 core (all its checks) | {ceiling:,.0f} ops/s |",
        f"| ceiling, one check per op, mix-weighted | {brief_ceiling:,.0f} ops/s |",
    ]
    for w, wall, inside, rate in results:
        extra = ""
        if base is not None and w != 1:
            extra = f"; {rate / base[3]:.2f}× 1 worker"
        lines.append(
            f"| `plc verify --workers {w}` | {rate:,.0f} ops/s ({wall:.2f} s wall) — "
            f"{rate / ceiling:.2f} of the 1-core ceiling, {rate / brief_ceiling:.2f} of the one-check form{extra} |"
        )
    if base is not None:
        one = base[3] / ceiling
        lines += [
            "",
            f"Targets: one core ≥ 0.85 of the ceiling — {'met' if one >= 0.85 else 'missed'} ({one:.2f}).",
        ]
        for w, _wall, _inside, rate in results:
            if w > 1:
                lines.append(
                    f"{w} workers ≥ 1.7× the one-core figure — {rate / base[3]:.2f}× the measured 1-worker rate "
                    f"({'met' if rate >= 1.7 * base[3] else 'missed'}); "
                    f"{rate / (0.85 * ceiling):.2f}× the 1-core target rate (0.85 of the ceiling)."
                )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        doc = ROOT / "docs" / "benchmarks.md"
        if not doc.exists():
            doc.write_text("# Benchmarks\n\nAppended by the scripts in bench/; newest last.\n")
        with open(doc, "a") as f:
            f.write(text)
        print(f"appended to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
