"""`plc verify`: vectors, compressed/stdin/multi-file inputs, the JSON report, exit codes,
malformed inputs, and the same report whatever the number of workers.

Most runs go through `plc.cli.main` in-process; stdin and the one-line usage errors go through
the installed `plc` script in a subprocess, as a user would run it.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

from plc.cli import main
from plc.core.errors import Reason
from plc.tools.generate import generate
from plc.tools.verify import verify_paths

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT.parent / "shared" / "vectors"
GO = VECTORS / "go-didplc" / "testdata"
CLJ = VECTORS / "atproto-clj" / "test" / "atproto" / "identity" / "fixtures"

VALID_LOGS = [
    GO / "log_bskyapp.json",
    GO / "log_bnewbold_robocracy.json",
    GO / "log_legacy_dholms.json",
    GO / "log_empty_rotation_keys.json",
    GO / "log_duplicate_rotation_keys.json",
    GO / "log_nullification.json",
    GO / "log_nullification_at_exactly_72h.json",
    GO / "log_tombstone.json",
    CLJ / "audit-log-legacy.json",
    CLJ / "audit-log-modern.json",
    VECTORS / "shadow-did-plc-server" / "audit_log_example_update.json",
]

# file -> (index of the rejected op in the array, reason) — vectors README
INVALID_LOGS = {
    "log_invalid_sig_b64_newline.json": (0, Reason.SIG_ENCODING),
    "log_invalid_sig_b64_padding_chars.json": (0, Reason.SIG_PADDING),
    "log_invalid_sig_b64_padding_bits.json": (0, Reason.SIG_ENCODING),
    "log_invalid_sig_der.json": (0, Reason.SIG_INVALID),
    "log_invalid_sig_k256_high_s.json": (0, Reason.SIG_HIGH_S),
    "log_invalid_nullification_reused_key.json": (2, Reason.SIG_INVALID),
    "log_invalid_update_nullified.json": (4, Reason.MISORDERED),
    "log_invalid_update_tombstoned.json": (2, Reason.MISORDERED),
}


def plc_command() -> list[str]:
    script = ROOT / ".venv" / "bin" / "plc"
    return [str(script)] if script.exists() else [sys.executable, "-m", "plc"]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """`plc verify --json --no-progress ARGS` in-process: (exit code, parsed report)."""
    code = main(["verify", "--json", "--no-progress", *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what legitimately differs between runs (timing, worker count)."""
    return {k: v for k, v in report.items() if k not in ("seconds", "workers")}


def audit_to_jsonl(path: Path) -> list[bytes]:
    """An audit-log array as compact export lines (legacy format: same fields)."""
    return [orjson.dumps(e) for e in json.loads(path.read_bytes())]


# ----------------------------------------------------------------------------- vectors
@pytest.mark.parametrize("path", VALID_LOGS, ids=lambda p: p.name)
def test_valid_vector_logs_pass(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    entries = json.loads(path.read_bytes())
    code, rep = run_json(capsys, "--workers", "1", str(path))
    assert code == 0
    assert rep["ok"] is True
    assert (rep["ops"], rep["valid"], rep["dids"]) == (len(entries), len(entries), 1)
    assert rep["rejected"]["total"] == 0
    assert rep["nullified_mismatch"]["total"] == 0
    assert rep["malformed"]["total"] == 0


@pytest.mark.parametrize("name", sorted(INVALID_LOGS))
def test_invalid_vector_logs_rejected_at_the_stated_op(capsys: pytest.CaptureFixture[str], name: str) -> None:
    index, reason = INVALID_LOGS[name]
    path = GO / name
    entries = json.loads(path.read_bytes())
    code, rep = run_json(capsys, "--workers", "1", str(path))
    assert code == 1
    assert rep["ok"] is False
    assert rep["rejected"]["by_reason"] == {reason: 1}
    (example,) = rep["rejected"]["examples"][reason]
    assert example["entry"] == index
    assert example["cid"] == entries[index]["cid"]
    assert example["did"] == entries[index]["did"]
    assert example["file"] == str(path)
    # the line number is where that element starts in the pretty-printed file
    text = path.read_text().splitlines()
    assert text[example["line"] - 1].strip().startswith("{")
    assert rep["valid"] == len(entries) - 1
    if name == "log_invalid_nullification_reused_key.json":
        # op #1 is stored as nullified, but the fork that would nullify it is rejected
        mismatch = rep["nullified_mismatch"]
        assert mismatch["total"] == 1
        assert mismatch["examples"][0]["entry"] == 1
        assert mismatch["examples"][0]["input_nullified"] is True
        assert mismatch["examples"][0]["computed_nullified"] is False
    else:
        assert rep["nullified_mismatch"]["total"] == 0


def test_all_vectors_in_one_run_with_two_workers(capsys: pytest.CaptureFixture[str]) -> None:
    """Every vector log at once: DIDs are independent, counts add up, workers agree."""
    paths = [str(p) for p in VALID_LOGS] + [str(GO / n) for n in sorted(INVALID_LOGS)]
    code1, rep1 = run_json(capsys, "--workers", "1", *paths)
    code2, rep2 = run_json(capsys, "--workers", "2", *paths)
    assert code1 == code2 == 1
    assert comparable(rep1) == comparable(rep2)
    assert rep1["nullified_mismatch"]["total"] == 1
    # log_legacy_dholms.json and audit-log-legacy.json hold the same DID: the first five ops of
    # the second are duplicates of what is already in the state; its last three extend it
    assert rep1["rejected"]["by_reason"][Reason.DUPLICATE] == 5
    assert rep1["rejected"]["total"] == len(INVALID_LOGS) + 5
    assert rep1["dids"] == len(VALID_LOGS) - 1 + len(INVALID_LOGS)


# ----------------------------------------------------------------------------- input forms
def test_gzip_and_zstd_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = GO / "log_nullification.json"
    gz = tmp_path / "log.json.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    zst = tmp_path / "export.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(audit_to_jsonl(GO / "log_bskyapp.json"))))
    # compression is recognised by content, not by name
    odd = tmp_path / "no-extension"
    odd.write_bytes(gzip.compress(b"\n".join(audit_to_jsonl(GO / "log_tombstone.json")) + b"\n"))
    code, rep = run_json(capsys, "--workers", "1", str(gz), str(zst), str(odd))
    assert code == 0
    assert (rep["ops"], rep["valid"], rep["dids"]) == (3 + 2 + 2, 7, 3)


def test_multi_member_gzip_is_read_to_the_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    lines = audit_to_jsonl(GO / "log_legacy_dholms.json")
    gz = tmp_path / "two-members.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\n".join(lines[:2]) + b"\n") + gzip.compress(b"\n".join(lines[2:]) + b"\n"))
    code, rep = run_json(capsys, "--workers", "1", str(gz))
    assert code == 0
    assert rep["valid"] == 5


def test_state_carries_across_files_in_the_given_order(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    lines = audit_to_jsonl(GO / "log_nullification.json")
    first = tmp_path / "a.jsonl"
    first.write_bytes(lines[0] + b"\n")
    rest = tmp_path / "b.jsonl"
    rest.write_bytes(b"\n".join(lines[1:]) + b"\n")
    code, rep = run_json(capsys, "--workers", "2", str(first), str(rest))
    assert code == 0
    assert rep["valid"] == 3
    # the other way round the updates come first; for a DID with no state every op is checked
    # as a genesis op (§4.1), so they fail there, and the genesis in the second file is fine
    code, rep = run_json(capsys, "--workers", "2", str(rest), str(first))
    assert code == 1
    assert rep["valid"] == 1
    assert rep["rejected"]["by_reason"] == {Reason.SIG_INVALID: 1, Reason.GENESIS_HASH: 1}
    places = sorted((e["file"], e["line"]) for ex in rep["rejected"]["examples"].values() for e in ex)
    assert places == [(str(rest), 1), (str(rest), 2)]


def test_stdin_alone_and_with_files(tmp_path: Path) -> None:
    data = b"\n".join(audit_to_jsonl(GO / "log_legacy_dholms.json")) + b"\n"
    other = GO / "log_bskyapp.json"
    for workers in ("1", "2"):
        proc = subprocess.run(
            [*plc_command(), "verify", "--json", "--workers", workers, "-", str(other)],
            input=data,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        rep = json.loads(proc.stdout)
        assert rep["files"] == ["-", str(other)]
        assert (rep["ops"], rep["valid"], rep["dids"]) == (7, 7, 2)
        assert b"Traceback" not in proc.stderr
    # compressed stdin, with an invalid op, reported as coming from "-"
    bad = gzip.compress(b"\n".join(audit_to_jsonl(GO / "log_invalid_sig_der.json")))
    proc = subprocess.run([*plc_command(), "verify", "--json", "-"], input=bad, capture_output=True, timeout=60)
    assert proc.returncode == 1
    rep = json.loads(proc.stdout)
    assert rep["rejected"]["examples"][Reason.SIG_INVALID][0]["file"] == "-"
    assert rep["rejected"]["examples"][Reason.SIG_INVALID][0]["line"] == 1


# ----------------------------------------------------------------------------- report and exit codes
def test_json_report_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, rep = run_json(capsys, "--workers", "1", str(GO / "log_invalid_nullification_reused_key.json"))
    assert code == 1
    assert set(rep) == {
        "ok", "files", "workers", "seconds", "records", "ops", "dids", "valid",
        "rejected", "nullified_mismatch", "malformed",
    }  # fmt: skip
    assert isinstance(rep["seconds"], float) and rep["workers"] == 1
    assert set(rep["rejected"]) == {"total", "by_reason", "examples"}
    assert set(rep["nullified_mismatch"]) == {"total", "examples"}
    assert set(rep["malformed"]) == {"total", "by_kind", "examples"}
    ex = rep["rejected"]["examples"][Reason.SIG_INVALID][0]
    assert set(ex) == {"file", "line", "entry", "did", "cid", "status", "message"}
    assert ex["status"] == 400 and ex["message"].startswith("Invalid signature on op: {")
    assert set(rep["nullified_mismatch"]["examples"][0]) == {
        "file", "line", "entry", "did", "cid", "input_nullified", "computed_nullified",
    }  # fmt: skip
    assert rep["records"] == rep["ops"] == 3


def test_human_summary_and_report_only(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(GO / "log_invalid_update_tombstoned.json")
    assert main(["verify", "--no-progress", "--workers", "1", path]) == 1
    out = capsys.readouterr().out
    assert "rejected:  1" in out and "misordered: 1" in out and out.rstrip().endswith("FAILED")
    assert f"{path}:33 (entry 2)" in out
    assert main(["verify", "--no-progress", "--report-only", "--workers", "1", path]) == 0
    assert capsys.readouterr().out.rstrip().endswith("FAILED")
    assert main(["verify", "--no-progress", str(GO / "log_bskyapp.json")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/export.jsonl"], "plc verify: no such file: /nonexistent/export.jsonl"),
        ([str(GO)], f"plc verify: is a directory, not a file: {GO}"),
        (["-", "-"], "plc verify: stdin ('-') can be given only once"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run([*plc_command(), "verify", *args], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == message
    assert proc.stdout == b""


def test_bad_worker_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--workers", "0", str(GO / "log_bskyapp.json")])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- malformed input
def test_malformed_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    good = audit_to_jsonl(GO / "log_bskyapp.json")
    sample = json.loads(good[1])
    lines = [
        good[0],  # 1: fine
        b'{"did":"did:plc:z72i7hdynmk6r22z27h6tvur", oops}',  # 2: bad JSON
        good[1][: len(good[1]) // 2],  # 3: truncated
        b'{"did":"did:plc:aaaaaaaaaaaaaaaaaaaaaaaa","pad":"' + b"x" * (2 << 20) + b'"}',  # 4: 2 MB line
        orjson.dumps({"did": sample["did"], "cid": sample["cid"], "seq": 7, "createdAt": sample["createdAt"],
                      "operation": sample["operation"], "type": "mystery_op"}),  # 5: unknown type  # fmt: skip
        orjson.dumps({k: v for k, v in sample.items() if k != "createdAt"}),  # 6: missing createdAt
        orjson.dumps({**sample, "createdAt": "yesterday"}),  # 7: unparseable timestamp
        orjson.dumps({**sample, "extra": 1}),  # 8: unknown field
        orjson.dumps({**sample, "nullified": "no"}),  # 9: wrong type
        b"[1, 2]",  # 10: not an object
        good[1],  # 11: fine (the update, after its genesis on line 1)
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rep = verify_paths([path], workers=1)
    assert (rep.ops, rep.valid, rep.rejected) == (2, 2, {})
    assert rep.malformed == 9
    got = [(e["line"], e["kind"]) for e in rep.malformed_examples]
    assert got == [
        (2, "json"), (3, "json"), (4, "too_long"), (5, "types"), (6, "fields"),
        (7, "created_at"), (8, "fields"), (9, "types"), (10, "not_object"),
    ]  # fmt: skip
    msgs = {e["line"]: e["message"] for e in rep.malformed_examples}
    assert "mystery_op" in msgs[5]
    assert "missing field 'createdAt'" in msgs[6]
    assert "unknown field 'extra'" in msgs[8]
    assert rep.malformed_kinds == {
        "json": 2, "too_long": 1, "types": 2, "fields": 2, "created_at": 1, "not_object": 1,
    }  # fmt: skip
    assert not rep.ok


def test_empty_binary_and_truncated_inputs_exit_1_without_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    binary = tmp_path / "random.bin"
    binary.write_bytes(random.Random(7).randbytes(20_000))
    arr = (GO / "log_nullification.json").read_bytes()
    cut_array = tmp_path / "cut.json"
    cut_array.write_bytes(arr[: len(arr) * 2 // 3])
    cut_gz = tmp_path / "cut.jsonl.gz"
    full = gzip.compress(b"\n".join(audit_to_jsonl(GO / "log_legacy_dholms.json")) + b"\n")
    cut_gz.write_bytes(full[: len(full) - 40])
    paths = [empty, binary, cut_array, cut_gz]
    proc = subprocess.run(
        [*plc_command(), "verify", "--json", "--workers", "2", *map(str, paths)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr
    rep = json.loads(proc.stdout)
    by_file: dict[str, list[tuple[int, str]]] = {}
    for e in rep["malformed"]["examples"]:
        by_file.setdefault(e["file"], []).append((e["line"], e["kind"]))
    assert by_file[str(empty)] == [(1, "empty")]
    assert by_file[str(binary)] == [(1, "binary")]
    # the array breaks off inside op #2, which starts on line 39
    entries = json.loads(arr)
    assert by_file[str(cut_array)] == [(39, "truncated")]
    assert rep["valid"] >= 2 and len(entries) == 3
    # the truncated gzip stream: its complete lines are checked, then the cut is reported
    assert by_file[str(cut_gz)][-1][1] == "stream"
    assert rep["malformed"]["by_kind"]["stream"] == 1


def test_unclosed_and_trailing_array_problems(tmp_path: Path) -> None:
    entries = audit_to_jsonl(GO / "log_bskyapp.json")
    trailing = tmp_path / "trailing.json"
    trailing.write_bytes(b"[\n" + b",\n".join(entries) + b"\n]\ngarbage\n")
    stray = tmp_path / "stray.json"
    stray.write_bytes(b"[" + entries[0] + b",," + entries[1] + b"]")
    empty_array = tmp_path / "none.json"
    empty_array.write_bytes(b"[ ]\n")
    rep = verify_paths([trailing, stray, empty_array], workers=1)
    got = [(Path(e["file"]).name, e["line"], e["kind"]) for e in rep.malformed_examples]
    assert got == [("trailing.json", 5, "array"), ("stray.json", 1, "array"), ("none.json", 1, "empty")]
    # the good elements still count: 2 from trailing.json, then the same 2 ops again in stray.json
    assert rep.valid == 2 and rep.rejected == {Reason.DUPLICATE: 2}


# ----------------------------------------------------------------------------- generated corpora
def _write_corpus(path: Path, *, seed: int, dids: int, fmt: str, invalid_rate: float) -> list[dict[str, Any]]:
    truth = []
    with open(path, "wb") as f:
        for line, t in generate(seed, dids, fmt=fmt, invalid_rate=invalid_rate, p256_share=0.2):
            f.write(line + b"\n")
            truth.append(t)
    return truth


@pytest.mark.parametrize("fmt", ["sequenced", "legacy"])
def test_generated_corpus_matches_truth_with_one_and_two_workers(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"export-{fmt}.jsonl"
    truth = _write_corpus(path, seed=11, dids=150, fmt=fmt, invalid_rate=0.1)
    reports = {w: verify_paths([path], workers=w, outcomes=True) for w in (1, 2)}
    one, two = reports[1], reports[2]
    assert comparable(one.to_json()) == comparable(two.to_json())
    assert one.outcomes == two.outcomes
    got = [(o.line, o.did, o.cid, o.valid, o.reason, o.nullified) for o in one.outcomes or []]
    want = [(t["line"], t["did"], t["cid"], t["valid"], t["reason"], t["nullified"]) for t in truth]
    assert got == want
    assert sum(not t["valid"] for t in truth) == one.rejected_total > 0
    assert any(t["nullified"] for t in truth)
    # legacy lines carry the final nullified flags, so none differs; sequenced lines have none
    assert one.nullified_mismatch == 0 and one.malformed == 0


def test_stdin_dispatch_gives_the_same_report_as_files(tmp_path: Path) -> None:
    path = tmp_path / "export.jsonl"
    truth = _write_corpus(path, seed=5, dids=80, fmt="legacy", invalid_rate=0.05)
    # flip the flag of one valid, live op so the mismatch path is exercised too
    lines = path.read_bytes().split(b"\n")
    i = next(n for n, t in enumerate(truth) if t["valid"] and not t["nullified"] and n > len(truth) // 2)
    assert b'"nullified":false' in lines[i]
    lines[i] = lines[i].replace(b'"nullified":false', b'"nullified":true')
    path.write_bytes(b"\n".join(lines))
    reports = []
    for workers, target in (("1", str(path)), ("2", str(path)), ("2", "-")):
        proc = subprocess.run(
            [*plc_command(), "verify", "--json", "--workers", workers, target],
            stdin=open(path, "rb") if target == "-" else subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr.decode()
        rep = json.loads(proc.stdout)
        rep["files"] = ["<input>"]
        for examples in rep["rejected"]["examples"].values():
            for e in examples:
                e["file"] = "<input>"
        for e in rep["nullified_mismatch"]["examples"]:
            e["file"] = "<input>"
        reports.append(comparable(rep))
    assert reports[0] == reports[1] == reports[2]
    (mismatch,) = reports[0]["nullified_mismatch"]["examples"]
    assert (mismatch["line"], mismatch["input_nullified"], mismatch["computed_nullified"]) == (i + 1, True, False)
    assert reports[0]["rejected"]["total"] == sum(not t["valid"] for t in truth)


def test_progress_bar_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = verify_paths([GO / "log_legacy_dholms.json"], workers=1, progress=True)
    err = capsys.readouterr().err
    assert rep.ok and "verify" in err
    rep = verify_paths([GO / "log_legacy_dholms.json"], workers=1, progress=False)
    assert rep.ok and capsys.readouterr().err == ""


def test_worker_count_defaults_to_cpu_count() -> None:
    rep = verify_paths([GO / "log_bskyapp.json"])
    assert rep.workers == len(os.sched_getaffinity(0))
    assert rep.ok
