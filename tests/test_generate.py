"""The synthetic-directory generator (`plc generate`, plc/tools/generate.py).

The generator derives every line's verdict by construction; here each generated corpus is
replayed through the chain engine (`chain.check_op`, REPLAY mode, with the line's cid) and
the engine's verdicts, reasons and final nullified flags must equal the truth file exactly.
Also checked: determinism, the two export line formats byte for byte, ordering and seq,
coverage of every invalid kind and of the valid features, and the command line.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any

import orjson
import pytest

from plc.cli import main
from plc.core import jsonfmt
from plc.core.chain import REPLAY, DidLog, check_op
from plc.core.errors import OpError, Reason
from plc.tools.generate import DEFAULT_START_MS, KINDS, generate, generate_with_kinds

WINDOW = 72 * 3_600_000
SEQUENCED_KEYS = ["did", "cid", "seq", "createdAt", "operation", "type"]
LEGACY_KEYS = ["did", "cid", "createdAt", "operation", "nullified"]
TRUTH_KEYS = ["line", "did", "cid", "valid", "reason", "nullified"]
# the reasons the brief asks the corpus to exercise
REQUIRED_REASONS = {
    Reason.SIG_HIGH_S, Reason.SIG_LENGTH, Reason.SIG_PADDING, Reason.SIG_ENCODING, Reason.SIG_INVALID,
    Reason.GENESIS_HASH, Reason.GENESIS_PREV, Reason.MISORDERED, Reason.LATE_RECOVERY, Reason.INVALID_SHAPE,
    Reason.CID_MISMATCH, Reason.NUL_CHARACTER, Reason.TIMESTAMP_ORDER, Reason.DUPLICATE,
}  # fmt: skip


def corpus(
    seed: int, dids: int, fmt: str = "sequenced", **kw: Any
) -> list[tuple[bytes, dict[str, Any], str]]:
    return list(generate_with_kinds(seed, dids, fmt=fmt, **kw))


def replay(rows: list[tuple[bytes, dict[str, Any], str]]) -> dict[str, Any]:
    """Replay every line in file order, one DidLog per DID; compare with the truth.

    Returns the mismatches and what the accepted ops looked like (for feature checks).
    """
    logs: dict[str, DidLog] = {}
    entries = {}
    mismatches = []
    lapses = []  # (ms from the first nullified op, kind of that op) for every nullification
    nullified_tombstones = 0
    for line, truth, kind in rows:
        obj = orjson.loads(line)
        did = obj["did"]
        log = logs.setdefault(did, DidLog(did))
        created = jsonfmt.parse_ms(obj["createdAt"])
        try:
            acc = check_op(
                log, did, obj["operation"], mode=REPLAY, created_at=created, cid=obj["cid"], raw=line
            )
        except OpError as err:
            got = (False, err.reason)
        else:
            got = (True, None)
            if acc.nullified:
                lapses.append(created - acc.nullified[0].created_at)
                nullified_tombstones += any(e.tombstone for e in acc.nullified)
            entries[truth["line"]] = log.apply(acc)
        if got != (truth["valid"], truth["reason"]):
            mismatches.append((truth, kind, got))
    for _, truth, kind in rows:
        entry = entries.get(truth["line"])
        if (entry.nullified if entry else False) != truth["nullified"]:
            mismatches.append((truth, kind, "nullified"))
    return {
        "mismatches": mismatches,
        "lapses": lapses,
        "nullified_tombstones": nullified_tombstones,
        "logs": logs,
    }


# ----------------------------------------------------------------------------- determinism and format
@pytest.mark.parametrize("fmt", ["sequenced", "legacy"])
def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(fmt: str) -> None:
    a = list(generate(7, 40, fmt=fmt, invalid_rate=0.1))
    b = list(generate(7, 40, fmt=fmt, invalid_rate=0.1))
    c = list(generate(8, 40, fmt=fmt, invalid_rate=0.1))
    assert a == b
    assert [line for line, _ in a] != [line for line, _ in c]
    assert not {line for line, _ in a} & {line for line, _ in c}


@pytest.mark.parametrize("fmt", ["sequenced", "legacy"])
def test_lines_have_the_export_key_order_and_byte_exact_rendering(fmt: str) -> None:
    rows = corpus(3, 60, fmt, invalid_rate=0.2)
    for line, truth, _ in rows:
        obj = orjson.loads(line)
        assert list(obj) == (SEQUENCED_KEYS if fmt == "sequenced" else LEGACY_KEYS)
        # the op's keys are in jsonb + V8 order at every level; the line is compact orjson
        rebuilt = dict(obj, operation=jsonfmt.op_order(obj["operation"]))
        assert jsonfmt.dumps(rebuilt) == line
        assert jsonfmt.format_ms(jsonfmt.parse_ms(obj["createdAt"])) == obj["createdAt"]
        if fmt == "sequenced":
            assert obj["type"] == "sequenced_op" and type(obj["seq"]) is int
        else:
            assert obj["nullified"] is truth["nullified"]


def test_key_order_traps_render_in_jsonb_v8_order() -> None:
    traps = [orjson.loads(line)["operation"] for line, _, kind in corpus(5, 40) if kind == "key_order_traps"]
    ids = [list(obj) for op in traps for obj in (op["services"], op["verificationMethods"])]
    for keys in ids:
        ints = [k for k in keys if k.isdigit()]
        others = [k for k in keys if not k.isdigit()]
        assert keys == sorted(ints, key=int) + sorted(others, key=lambda k: (len(k.encode()), k.encode()))
    assert any({"2", "10"} <= set(keys) for keys in ids)  # "2" sorts before "10"
    assert any("é" in keys and "ab" in keys for keys in ids)  # 2-byte "é" sorts after "ab"


def test_truth_file_is_aligned_with_the_lines() -> None:
    rows = corpus(11, 80, "legacy", invalid_rate=0.3)
    assert len(rows) > 80
    for n, (line, truth, kind) in enumerate(rows, 1):
        obj = orjson.loads(line)
        assert list(truth) == TRUTH_KEYS
        assert truth["line"] == n
        assert (truth["did"], truth["cid"]) == (obj["did"], obj["cid"])
        assert (truth["reason"] is None) == truth["valid"]
        if not truth["valid"]:
            assert truth["nullified"] is False
            assert truth["reason"] == KINDS[kind].reason


def test_export_order_seq_and_start() -> None:
    start = jsonfmt.parse_ms("2024-06-01T12:00:00.000Z")
    rows = corpus(2, 150, invalid_rate=0.1, start_ms=start)
    objs = [orjson.loads(line) for line, _, _ in rows]
    keys = [(jsonfmt.parse_ms(o["createdAt"]), o["cid"]) for o in objs]
    assert keys == sorted(keys)
    assert keys[0][0] == start and all(t >= start for t, _ in keys)
    seqs = [o["seq"] for o in objs]
    assert seqs[0] == 1 and all(b > a for a, b in itertools.pairwise(seqs))
    assert keys[-1][0] - start > 7 * 24 * 3_600_000  # spread over more than a week
    first = orjson.loads(corpus(2, 3)[0][0])
    assert first["createdAt"] == jsonfmt.format_ms(DEFAULT_START_MS) == "2023-01-01T00:00:00.000Z"


# ----------------------------------------------------------------------------- the truth is the engine's verdict
@pytest.mark.parametrize("fmt", ["sequenced", "legacy"])
def test_replaying_the_corpus_gives_exactly_the_truth(fmt: str) -> None:
    rows = corpus(1 if fmt == "sequenced" else 2, 300, fmt, invalid_rate=0.2, p256_share=0.3)
    result = replay(rows)
    assert result["mismatches"] == []
    invalid = sum(not t["valid"] for _, t, _ in rows)
    assert 0.12 < invalid / len(rows) < 0.28
    # the valid side has the features the brief asks for
    lapses = result["lapses"]
    assert WINDOW in lapses and any(x < WINDOW for x in lapses)
    assert result["nullified_tombstones"] >= 1
    assert any(t["nullified"] for _, t, _ in rows)
    kinds = collections.Counter(kind for _, t, kind in rows if t["valid"])
    for feature in (
        "legacy_genesis", "legacy_upgrade", "handle_change", "pds_migration", "signing_key_rotation",
        "recovery_key_added", "key_order_traps", "duplicate_rotation_keys", "empty_rotation_keys",
        "tombstone", "hijack", "recovery", "recovery_72h", "recovery_repeated",
    ):  # fmt: skip
        assert kinds[feature] > 0, feature


def test_every_invalid_kind_appears_in_a_small_corpus() -> None:
    rows = corpus(4, 12, invalid_rate=0.02)
    kinds = {kind for _, t, kind in rows if not t["valid"]}
    assert kinds == set(KINDS)
    assert {t["reason"] for _, t, _ in rows if not t["valid"]} == REQUIRED_REASONS
    assert replay(rows)["mismatches"] == []


def test_invalid_kinds_and_p256_share_zero() -> None:
    rows = corpus(6, 30, invalid_rate=0.05, p256_share=0.0)
    kinds = {kind for _, t, kind in rows if not t["valid"]}
    assert kinds == set(KINDS) - {"sig_high_s_p256"}
    for line, _, _ in rows:
        op = orjson.loads(line)["operation"]
        assert not any(k.startswith("did:key:zDna") for k in op.get("rotationKeys", []) if isinstance(k, str))


def test_shared_pds_keys_p256_share_and_ops_per_did() -> None:
    rows = corpus(9, 1000, invalid_rate=0.02, p256_share=0.25)
    geneses = [orjson.loads(line)["operation"] for line, _, kind in rows if kind == "genesis"]
    rotation = collections.Counter(k for op in geneses for k in set(op["rotationKeys"]))
    shared = [k for k, n in rotation.items() if n > 2]
    assert 3 <= len(shared) <= 5  # a few PDS keys; every other rotation key belongs to one DID
    assert sum(any(k in shared for k in op["rotationKeys"]) for op in geneses) > 0.85 * len(geneses)
    assert rotation.most_common(1)[0][1] > 0.6 * len(geneses)
    p256_dids = sum(any(k.startswith("did:key:zDna") for k in op["rotationKeys"]) for op in geneses)
    assert 0.18 < p256_dids / len(geneses) < 0.32
    dids = {t["did"] for _, t, _ in rows if t["valid"]}
    assert 2.5 <= sum(t["valid"] for _, t, _ in rows) / len(dids) <= 4


def test_no_invalid_ops_at_rate_zero() -> None:
    rows = corpus(10, 100, invalid_rate=0.0)
    assert all(t["valid"] for _, t, _ in rows)
    assert replay(rows)["mismatches"] == []


@pytest.mark.parametrize(
    "kw",
    [{"fmt": "json"}, {"invalid_rate": 1.0}, {"invalid_rate": -0.1}, {"p256_share": 1.5}, {"start_ms": -1}],
)
def test_api_rejects_bad_options(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        list(generate(1, 5, **kw))
    with pytest.raises(ValueError):
        list(generate(1, -1))
    with pytest.raises(TypeError):
        list(generate(1, 2.5))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- command line
def test_cli_writes_the_export_and_truth_files(tmp_path, capsys) -> None:
    out = tmp_path / "corpus.jsonl"
    code = main(["generate", "--seed", "12", "--dids", "25", "--out", str(out), "--format", "legacy",
                 "--invalid-rate", "0.1", "--p256-share", "0.2"])  # fmt: skip
    assert code == 0
    expected = list(generate(12, 25, fmt="legacy", invalid_rate=0.1, p256_share=0.2))
    assert out.read_bytes() == b"".join(line + b"\n" for line, _ in expected)
    truth = (tmp_path / "corpus.jsonl.truth.jsonl").read_bytes()
    assert truth == b"".join(jsonfmt.dumps(t) + b"\n" for _, t in expected)
    assert f"wrote {len(expected)} ops" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "corpus.jsonl.truth.jsonl"]


@pytest.mark.parametrize(
    "args",
    [
        ["--dids", "abc"],
        ["--dids", "0"],
        ["--dids", "-4"],
        ["--invalid-rate", "1.5"],
        ["--invalid-rate", "x"],
        ["--p256-share", "2"],
        ["--seed", "1.5"],
        ["--format", "csv"],
        ["--start", "yesterday"],
    ],
)
def test_cli_bad_numbers_give_one_line_errors(tmp_path, capsys, args: list[str]) -> None:
    base = {"--seed": "1", "--dids": "3", "--out": str(tmp_path / "x.jsonl")}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as exc:
        main(["generate", *[x for kv in base.items() for x in kv]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("plc generate: error: ") and args[0] in err
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_paths_give_one_line_errors(tmp_path, capsys) -> None:
    for out in (tmp_path / "missing" / "x.jsonl", tmp_path):
        assert main(["generate", "--seed", "1", "--dids", "3", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("plc generate: error: ") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
