"""plc.sync.upstream against the fake upstream directory (tests/fake_upstream.py, loopback only):
paging and cursors, the pages ⇄ stream state machine on every close reason, retries and
Retry-After, politeness, legacy de-duplication, malformed lines, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time

import httpx
import orjson
import pytest

from fake_upstream import FakeRecord, PageFault, StreamFault, fake_upstream_factory, record_from_line  # noqa: F401
from plc.sync.upstream import (
    CONSUMER_TOO_SLOW,
    DISCONNECTED,
    FUTURE_CURSOR,
    MAX_LINE_BYTES,
    OUTDATED_CURSOR,
    CursorAhead,
    MalformedLine,
    StreamClosed,
    Upstream,
    UpstreamError,
    UpstreamRecord,
    parse_line,
    parse_retry_after,
)
from plc.tools.generate import generate

pytestmark = pytest.mark.timeout(60)

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


def now_ms() -> int:
    return int(time.time() * 1000)


def synthetic(n: int, start_ms: int, step_ms: int = 1000, first_seq: int = 1) -> list[FakeRecord]:
    """n records with distinct DIDs/CIDs (the reader does not validate ops)."""
    return [
        FakeRecord(f"did:plc:fake{first_seq + i:020d}", f"bafyfake{first_seq + i:040d}", first_seq + i,
                   start_ms + i * step_ms, {"type": "plc_tombstone", "prev": "x", "sig": f"s{i}"})
        for i in range(n)
    ]


def upstream(fake, **kw) -> Upstream:
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("poll_interval_s", 0.05)
    kw.setdefault("max_retry_s", 10)
    return Upstream(fake.url, **kw)


async def collect(agen, until) -> list:
    """Batches from `agen` until `until(batches)` is true (the generator is closed afterwards)."""
    batches = []
    async with contextlib.aclosing(agen):
        async for batch in agen:
            batches.append(batch)
            if until(batches):
                break
    return batches


def seqs_of(batches) -> list[int]:
    return [r.seq for b in batches for r in b.records if isinstance(r, UpstreamRecord)]


# ---- parsing ----


def test_parse_line_reads_all_three_formats():
    seq_line = b'{"did":"did:plc:a","cid":"bafyx","seq":7,"createdAt":"2024-01-02T03:04:05.678Z","operation":{"type":"plc_tombstone"},"type":"sequenced_op"}'
    rec = parse_line(seq_line)
    assert (rec.did, rec.cid, rec.seq, rec.nullified, rec.raw) == ("did:plc:a", "bafyx", 7, None, seq_line)
    assert rec.created_ms == 1704164645678 and rec.created_at == "2024-01-02T03:04:05.678Z"
    legacy = b'{"did":"did:plc:a","cid":"bafyx","createdAt":"2024-01-02T03:04:05.678Z","operation":{},"nullified":true}'
    assert (parse_line(legacy).seq, parse_line(legacy).nullified) == (None, True)
    message = '{"seq":9,"type":"sequenced_op","did":"did:plc:b","operation":{},"cid":"bafyy","createdAt":"2024-01-02T03:04:05.000Z"}'
    assert parse_line(message).seq == 9


@pytest.mark.parametrize(
    "raw, reason_part",
    [
        (b"{not json", "invalid JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"did":"d","cid":"c","seq":1,"createdAt":"2024-01-01T00:00:00.000Z","operation":{},"type":"other"}',
         "unknown type"),
        (b'{"did":"d","cid":"c","seq":"1","createdAt":"2024-01-01T00:00:00.000Z","operation":{}}', "seq"),
        (b'{"did":"d","cid":"c","seq":true,"createdAt":"2024-01-01T00:00:00.000Z","operation":{}}', "seq"),
        (b'{"did":5,"cid":"c","seq":1,"createdAt":"2024-01-01T00:00:00.000Z","operation":{}}', "did"),
        (b'{"did":"d","seq":1,"createdAt":"2024-01-01T00:00:00.000Z","operation":{}}', "cid"),
        (b'{"did":"d","cid":"c","seq":1,"createdAt":"yesterday","operation":{}}', "createdAt"),
        (b'{"did":"d","cid":"c","seq":1,"createdAt":"2024-01-01T00:00:00.000Z","operation":[]}', "operation"),
        (b'{"did":"d","cid":"c","createdAt":"2024-01-01T00:00:00.000Z","operation":{},"nullified":1}', "nullified"),
        (b'{"did":"' + b"x" * MAX_LINE_BYTES + b'"}', "exceeds"),
        (b"\xff\xfe", "invalid JSON"),
    ],
)
def test_parse_line_malformed_gives_reason(raw, reason_part):
    with pytest.raises(MalformedLine) as info:
        parse_line(raw)
    assert reason_part in info.value.reason
    assert info.value.raw == raw[:256] if len(raw) > MAX_LINE_BYTES else info.value.raw == raw


def test_parse_line_keeps_seq_of_malformed_line():
    with pytest.raises(MalformedLine) as info:
        parse_line(b'{"seq":12,"type":"sequenced_op","did":"d"}')
    assert info.value.seq == 12


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0
    base = time.time()
    date = email.utils.formatdate(base + 20, usegmt=True)
    assert 18 <= parse_retry_after(date, now=base) <= 21
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# ---- the fake itself: /export parameter parsing per spec §1.5 ----


async def test_fake_export_parses_count_and_after_like_the_reference(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(30, 1_700_000_000_000))
    async with httpx.AsyncClient(base_url=fake.url) as client:
        lines = lambda r: r.content.split(b"\n") if r.content else []  # noqa: E731
        assert len(lines(await client.get("/export", params={"count": "10abc", "after": "0"}))) == 10
        assert len(lines(await client.get("/export", params={"count": "1.5", "after": "0"}))) == 1
        for bad in ("0", "abc", "-3"):
            r = await client.get("/export", params={"count": bad})
            assert (r.status_code, r.json()) == (400, {"message": "Invalid count parameter"})
        r = await client.get("/export", params={"after": "not a date"})
        assert (r.status_code, r.json()) == (400, {"message": "Invalid after parameter"})
        # legacy mode: strict createdAt > after, legacy key order, nullified present
        r = await client.get("/export", params={"after": "2023-11-14T22:13:25.000Z", "count": "3"})
        first = orjson.loads(lines(r)[0])
        assert list(first) == ["did", "cid", "createdAt", "operation", "nullified"]
        assert first["createdAt"] == "2023-11-14T22:13:26.000Z"
        assert all(parse_line(x).created_ms > 1_700_000_005_000 for x in lines(r))
        # a repeated parameter is ignored: count=1&count=2 acts as the default 1000
        r = await client.get("/export?after=0&count=1&count=2")
        assert len(lines(r)) == 30
        assert r.headers["content-type"] == "application/jsonlines"


# ---- sequenced pages and the state machine ----


async def test_pages_in_order_with_next_cursors_then_stream(fake_upstream_factory):
    lines = [line for line, _ in generate(3, 4)]  # realistic ops, dated 2023: far behind
    fake = await fake_upstream_factory([record_from_line(x) for x in lines])
    latest = fake.latest_seq
    up = upstream(fake, page_count=10)
    got_live = []

    def until(batches):
        if batches[-1].mode == "pages" and batches[-1].next_cursor == latest and not got_live:
            got_live.append(True)
            fake.append(synthetic(1, now_ms(), first_seq=latest + 1))
        return batches[-1].mode == "stream"

    batches = await collect(up.follow(0), until)
    pages = batches[:-1]
    assert [b.next_cursor for b in pages] == [min(latest, 10 * (i + 1)) for i in range(len(pages))]
    assert [r.raw for b in pages for r in b.records] == lines  # byte-identical, in order
    assert seqs_of(batches) == list(range(1, latest + 2))
    streams = fake.requests_of("stream")
    assert [s.query["cursor"] for s in streams] == [str(latest)]
    await up.aclose()


@pytest.mark.parametrize("reason", [CONSUMER_TOO_SLOW, None], ids=["ConsumerTooSlow", "dropped"])
async def test_stream_close_goes_back_to_pages_and_resumes_from_last_cursor(fake_upstream_factory, reason):
    start = now_ms() - HOUR_MS
    fake = await fake_upstream_factory(synthetic(10, start))
    fake.stream_faults.append(StreamFault(after=2, reason=reason))
    up = upstream(fake, page_count=4, cutover_s=1)  # only a short page counts as caught up
    loop = asyncio.get_running_loop()

    def until(batches):
        last = batches[-1]
        if (last.mode, last.next_cursor) == ("pages", 10):  # caught up: the stream opens at 10
            fake.append(synthetic(6, start + 20_000, first_seq=11))
        if (last.mode, last.next_cursor) == ("pages", 16):  # after the close, pages got 13..16
            loop.call_later(0.3, fake.append, synthetic(1, start + 40_000, first_seq=17))
        return last.next_cursor >= 17 or len(batches) > 40

    batches = await collect(up.follow(0), until)
    assert seqs_of(batches) == list(range(1, 18))
    assert [(b.mode, b.next_cursor) for b in batches] == [
        ("pages", 4), ("pages", 8), ("pages", 10), ("stream", 11), ("stream", 12), ("pages", 16), ("stream", 17)
    ]
    assert [s.query["cursor"] for s in fake.requests_of("stream")] == ["10", "16"]
    assert [r.query["after"] for r in fake.requests_of("export")] == ["0", "4", "8", "12", "16"]
    await up.aclose()


async def test_outdated_cursor_falls_back_to_pages_until_a_short_page(fake_upstream_factory):
    start = now_ms() - 40 * DAY_MS
    records = synthetic(12, start)
    fake = await fake_upstream_factory(records)
    # The client's clock says the data is recent, so it tries the stream after the first page;
    # the fake (real clock, 7-day window) answers OutdatedCursor.
    up = upstream(fake, page_count=5, clock=lambda: (start + 20_000) / 1000, cutover_s=3600)
    appended = []

    def until(batches):
        if batches[-1].next_cursor == 12 and not appended:
            appended.append(True)
            fake.outdated_ms = 100 * DAY_MS
            fake.append(synthetic(1, start + 60_000, first_seq=13))
        return batches[-1].mode == "stream"

    batches = await collect(up.follow(0), until)
    assert seqs_of(batches) == list(range(1, 14))
    assert [s.query["cursor"] for s in fake.requests_of("stream")] == ["5", "12"]
    assert [b.mode for b in batches] == ["pages", "pages", "pages", "stream"]
    await up.aclose()


async def test_stream_reports_close_reasons(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(5, now_ms() - 30 * DAY_MS))
    up = upstream(fake)
    for cursor, reason in ((99, FUTURE_CURSOR), (0, OUTDATED_CURSOR)):
        with pytest.raises(StreamClosed) as info:
            async for _ in up.stream(cursor):
                pass
        assert (info.value.reason, info.value.code) == (reason, 1000)
    fake.outdated_ms = 100 * DAY_MS
    fake.stream_faults.append(StreamFault(after=3, reason=None))
    got = []
    with pytest.raises(StreamClosed) as info:
        async for item in up.stream(0):
            got.append(item.seq)
    assert got == [1, 2, 3] and info.value.reason == DISCONNECTED
    await up.aclose()


async def test_deleted_history_makes_follow_raise_cursor_ahead(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(8, now_ms() - HOUR_MS))
    fake.delete([6, 7, 8])  # upstream removed its tail: our cursor 8 is now in its future
    up = upstream(fake, future_cursor_limit=3)
    with pytest.raises(CursorAhead):
        await collect(up.follow(8), lambda b: False)
    assert [s.query["cursor"] for s in fake.requests_of("stream")] == ["8", "8", "8"]
    await up.aclose()


async def test_duplicates_and_backward_seq_are_delivered_and_cursor_never_regresses(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(8, now_ms() - HOUR_MS))
    fake.duplicated.add(3)
    fake.seq_shown[6] = 2  # the line for seq 6 claims seq 2
    fake.dropped.add(5)
    up = upstream(fake, page_count=1000)
    page = await up.export_page(0)
    assert [r.seq for r in page] == [1, 2, 3, 3, 4, 2, 7, 8]
    batches = await collect(up.follow(0), lambda b: True)
    assert batches[0].next_cursor == 8 and batches[0].mode == "pages"
    await up.aclose()


async def test_malformed_and_oversized_lines_come_back_as_values(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(12, now_ms() - 30 * DAY_MS))
    fake.replaced[3] = b"{not json"
    fake.replaced[5] = b'{"did":"' + b"x" * (MAX_LINE_BYTES + 100_000) + b'"}'
    fake.replaced[7] = b'{"did":"d","cid":"c","seq":7,"createdAt":"2024-01-01T00:00:00.000Z","operation":{},"type":"x"}'
    fake.replaced[10] = b"[]"  # the last line of the first page
    up = upstream(fake, page_count=10)
    batches = await collect(up.follow(0), lambda b: b[-1].next_cursor >= 12)
    first = batches[0].records
    bad = {i: item.reason for i, item in enumerate(first) if isinstance(item, MalformedLine)}
    assert set(bad) == {2, 4, 6, 9}
    assert "invalid JSON" in bad[2] and "exceeds" in bad[4] and "unknown type" in bad[6]
    assert len(first[4].raw) == 256
    # seq 7 could still be read from its malformed line; seq 10 could not, so the cursor stops at 9
    assert batches[0].next_cursor == 9
    assert seqs_of(batches) == [1, 2, 4, 6, 8, 9, 11, 12]
    await up.aclose()


# ---- retries and politeness ----


async def test_retries_500_and_disconnect_mid_page(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(20, now_ms() - HOUR_MS))
    fake.page_faults += [PageFault(status=500), PageFault(disconnect_after_lines=3), PageFault(status=503)]
    up = upstream(fake)
    page = await up.export_page(0, 10)
    assert [r.seq for r in page] == list(range(1, 11))
    assert [r.status for r in fake.requests_of("export")] == [500, 200, 503, 200]
    await up.aclose()


async def test_429_retry_after_is_honoured(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(3, now_ms() - HOUR_MS))
    fake.page_faults.append(PageFault(status=429, retry_after="1", body='{"message":"slow down"}'))
    up = upstream(fake)
    page = await up.export_page(0, 10)
    stamps = [r.t for r in fake.requests_of("export")]
    assert len(page) == 3 and len(stamps) == 2
    assert stamps[1] - stamps[0] >= 0.95  # the backoff alone would be ~0.01 s
    await up.aclose()


@pytest.mark.parametrize("status", [400, 404, 410])
async def test_other_4xx_is_not_retried(fake_upstream_factory, status):
    fake = await fake_upstream_factory(synthetic(3, now_ms() - HOUR_MS))
    fake.page_faults.append(PageFault(status=status, body='{"message":"Invalid after parameter"}'))
    up = upstream(fake)
    with pytest.raises(UpstreamError) as info:
        await up.export_page(0, 10)
    assert info.value.status == status and "Invalid after parameter" in info.value.body
    assert len(fake.requests_of("export")) == 1
    await up.aclose()


async def test_retries_give_up_after_max_attempts(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(3, now_ms() - HOUR_MS))
    fake.page_faults += [PageFault(status=503)] * 5
    up = upstream(fake, max_attempts=3)
    with pytest.raises(UpstreamError) as info:
        await up.export_page(0, 10)
    assert info.value.status == 503 and len(fake.requests_of("export")) == 3
    await up.aclose()


async def test_requests_in_any_window_never_exceed_the_limit(fake_upstream_factory):
    fake = await fake_upstream_factory(synthetic(10, now_ms() - HOUR_MS))
    fake.page_faults += [PageFault(status=500), PageFault(), PageFault(status=429, retry_after="0")]
    limit, window = 3, 0.5
    up = upstream(fake, requests_per_window=limit, window_s=window)
    for after in range(5):
        assert (await up.export_page(after, 2))[0].seq == after + 1
    stamps = sorted(r.t for r in fake.requests)
    assert len(stamps) == 7  # 5 pages + 2 retries, all counted
    # Arrival times at the fake; 0.1 s allows for delivery jitter on a loaded machine.
    for i, t in enumerate(stamps):
        assert sum(1 for u in stamps[i:] if u < t + window - 0.1) <= limit
    assert stamps[-1] - stamps[0] >= 2 * window * 0.95
    await up.aclose()


# ---- legacy timestamp mode ----


async def test_legacy_paging_deduplicates_page_boundary_and_catches_late_commits(fake_upstream_factory):
    base = now_ms() - HOUR_MS
    # createdAt: 0,1,2,3 | 3,3,3,4 (a same-ms run straddling the 4-line page edge), 5, 6
    offsets = [0, 1, 2, 3, 3, 3, 3, 4, 5, 6]
    records = [FakeRecord(r.did, r.cid, r.seq, base + off, r.operation)
               for r, off in zip(synthetic(10, base), offsets)]
    fake = await fake_upstream_factory(records)
    keys = {(r.did, r.cid) for r in records}

    # Naive strict paging (after = last createdAt) loses the rows sharing the edge millisecond.
    naive = upstream(fake, page_count=4, legacy_overlap_ms=0)
    seen_naive = []
    after = None
    while True:
        page = await naive.export_page_legacy(after, 4)
        seen_naive += [r.key for r in page]
        if len(page) < 4:
            break
        after = page[-1].created_at
    assert len(seen_naive) < len(keys)
    await naive.aclose()

    up = upstream(fake, page_count=4, legacy_overlap_ms=50)
    late = FakeRecord("did:plc:late", "bafylate", 11, base + 5, {"type": "plc_tombstone"})  # older than the head
    appended = []

    def until(batches):
        got = [r.key for b in batches for r in b.records]
        if set(got) >= keys and not appended:
            appended.append(True)
            fake.append([late])
        return (late.did, late.cid) in got

    batches = await collect(up.follow_legacy(None), until)
    got = [r.key for b in batches for r in b.records]
    assert len(got) == len(set(got)) == len(keys) + 1  # each exactly once, the late commit included
    assert all(b.mode == "legacy" for b in batches)
    assert batches[-1].next_cursor == records[-1].created_at
    assert all(r.nullified is False for b in batches for r in b.records)
    await up.aclose()
