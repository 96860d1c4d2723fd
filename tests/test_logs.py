"""plc.logs: text and JSON log lines; `plc sync --log-format json` writes nothing but JSON objects
on stderr (against an unreachable upstream and an unreachable database)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import orjson
import pytest

from plc import logs
from test_ingest import REPO, connect, plc_cmd, run_cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def test_json_lines_carry_time_level_logger_message_extras_and_exc(capsys, restore_logging):
    command = logs.configure("json", logging.WARNING, "plc test")
    log = logging.getLogger("plc.test.thing")
    log.info("hidden below the level")
    log.warning("page %d failed", 7, extra={"upstream": "http://x", "attempt": 2, "odd": {1, 2}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.error("it broke", exc_info=True)
    command.info("progress line")
    lines = capsys.readouterr().err.splitlines()
    objs = [orjson.loads(line) for line in lines]
    assert [o["msg"] for o in objs] == ["page 7 failed", "it broke", "progress line"]
    first = objs[0]
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert first["level"] == "warning" and first["logger"] == "plc.test.thing"
    assert first["upstream"] == "http://x" and first["attempt"] == 2 and first["odd"] == "{1, 2}"
    assert len(first["ts"]) == 24 and first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert "Traceback" in objs[1]["exc"] and "ValueError: boom" in objs[1]["exc"]
    assert objs[2]["level"] == "info" and objs[2]["logger"] == logs.COMMAND_LOGGER


def test_iso_ms():
    assert logs.iso_ms(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"
    assert logs.iso_ms(0) == "1970-01-01T00:00:00.000Z"


def test_text_lines_keep_the_commands_forms(capsys, restore_logging):
    command = logs.configure("text", logging.WARNING, "plc sync")
    logs.configure("text", logging.WARNING, "plc sync")  # twice: still one handler
    command.info("following x")
    command.error("database: refused")
    logging.getLogger("plc.sync.upstream").warning("retry %d", 1)
    assert capsys.readouterr().err.splitlines() == [
        "plc sync: following x",
        "plc sync: error: database: refused",
        "plc sync: WARNING plc.sync.upstream: retry 1",
    ]
    with pytest.raises(ValueError):
        logs.configure("xml")


async def test_plc_sync_json_logs_against_an_unreachable_upstream(pg_dsn):
    conn = await connect(pg_dsn)
    await conn.close()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PLC_LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        *plc_cmd("sync", "--database-url", pg_dsn, "--upstream", "http://127.0.0.1:9",
                 "--ingest-workers", "0"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO,
    )
    lines: list[bytes] = []
    try:
        while not any(b"retry" in line for line in lines):  # a failed attempt was logged
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, b"".join(lines).decode()
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0
    lines += rest.splitlines()
    objs = [orjson.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(o) for o in objs)
    assert objs[0]["msg"].startswith("following http://127.0.0.1:9")
    warning = next(o for o in objs if o["level"] == "warning")
    assert warning["logger"] == "plc.sync.upstream" and "retry" in warning["msg"]
    assert objs[-1]["msg"].startswith("stopped at cursor 0")


def test_plc_sync_json_errors_and_bad_log_format():
    nowhere = "postgresql://nobody@127.0.0.1:9/x"
    out = run_cli("sync", "--database-url", nowhere, "--upstream", "http://127.0.0.1:9",
                  "--log-format", "json")
    assert out.returncode == 1
    objs = [orjson.loads(line) for line in out.stderr.splitlines()]
    assert len(objs) == 1 and objs[0]["level"] == "error" and objs[0]["msg"].startswith("database: ")
    out = run_cli("sync", "--log-format", "xml")
    assert out.returncode == 2 and "must be one of text, json, not 'xml'" in out.stderr
    out = run_cli("serve", "--log-format", "XML")
    assert out.returncode == 2 and "must be one of text, json" in out.stderr
    out = run_cli("sync", "--upstream-mode", "streaming")
    assert out.returncode == 2 and "must be one of auto, sequenced, legacy" in out.stderr

