"""Input side of `plc verify`: open a path (plain, gzip, zstd or stdin), and turn it into records.

A record is one candidate op: a line of export JSONL, or one element of an audit-log JSON array.
Each comes with its 1-based line number (for an array element: the line it starts on) and, for
arrays, its 0-based position in the array. Problems that are not about one parseable record (an
over-long line, a truncated compressed stream, an unclosed array, an empty file) come out as
records with a ``problem`` text instead of bytes, so the caller reports them with their place in
the file and carries on; nothing here raises for bad content.

Compression is recognised by its magic bytes, not by the file name, so `.gz`/`.zst` files with
other names and compressed stdin work too.
"""

from __future__ import annotations

import os
import re
import sys
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

STDIN = "-"
MAX_RECORD_BYTES = 1 << 20  # a line (or array element) longer than this is malformed, unread
READ_SIZE = 1 << 20  # raw bytes read per call from a plain file or stdin
ZSTD_READ_SIZE = 1 << 16  # smaller raw reads for zstd: its output per call is not bounded
GZIP_OUT_MAX = 1 << 22  # gzip output per call is bounded to this
BINARY_SNIFF = 1 << 16  # a NUL byte in the first 64 KiB marks a binary (non-JSON) file

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class UsageError(ValueError):
    """A path that cannot be verified at all (missing, a directory, unreadable)."""


# A record is a plain tuple (cheapest to make and to send to a worker):
#   (line, entry, raw, problem, kind)
# ``line`` is 1-based; ``entry`` the 0-based position in an audit-log array (None for JSONL);
# ``raw`` the record's JSON text, or None when ``problem`` says what is wrong at that place and
# ``kind`` names the problem (too_long, truncated, array, empty, binary, stream).
Record = tuple[int, "int | None", "bytes | None", "str | None", "str | None"]
LINE, ENTRY, RAW, PROBLEM, KIND = range(5)


def _problem(line: int, entry: int | None, message: str, kind: str) -> Record:
    return (line, entry, None, message, kind)


def check_paths(paths: list[str]) -> None:
    """Raise UsageError (one clear line) for a path that cannot be opened for reading."""
    if not paths:
        raise UsageError("no input given")
    if paths.count(STDIN) > 1:
        raise UsageError("stdin ('-') can be given only once")
    for p in paths:
        if p == STDIN:
            continue
        if not os.path.exists(p):
            raise UsageError(f"no such file: {p}")
        if os.path.isdir(p):
            raise UsageError(f"is a directory, not a file: {p}")
        if not os.access(p, os.R_OK):
            raise UsageError(f"cannot read (permission denied): {p}")


def input_size(path: str) -> int | None:
    """On-disk size in bytes (None for stdin or a non-regular file such as a pipe)."""
    if path == STDIN:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if os.path.isfile(path) else None


class InputStream:
    """Raw bytes of one input, decompressed on the fly.

    ``consumed`` counts the raw (on-disk, possibly compressed) bytes read so far, for progress.
    ``chunks()`` yields decompressed data; a decompression error or a truncated stream ends it
    and leaves the reason in ``error``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.consumed = 0
        self.error: str | None = None
        self.compression = "none"

    def _open(self) -> BinaryIO:
        if self.path == STDIN:
            return sys.stdin.buffer
        return open(self.path, "rb", buffering=0)

    def chunks(self) -> Iterator[bytes]:
        try:
            fh = self._open()
        except OSError as exc:
            self.error = f"cannot open: {exc.strerror or exc}"
            return
        try:
            yield from self._decoded(fh)
        except OSError as exc:
            self.error = f"read error: {exc.strerror or exc}"
        finally:
            if self.path != STDIN:
                fh.close()

    def _raw(self, fh: BinaryIO, first: bytes, size: int) -> Iterator[bytes]:
        if first:
            yield first
        read = fh.read
        while True:
            block = read(size)
            if not block:
                return
            self.consumed += len(block)
            yield block

    def _decoded(self, fh: BinaryIO) -> Iterator[bytes]:
        first = fh.read(READ_SIZE)
        # a pipe may deliver fewer bytes than the magic numbers; top up
        while first and len(first) < 4:
            more = fh.read(READ_SIZE)
            if not more:
                break
            first += more
        self.consumed = len(first)
        if first.startswith(GZIP_MAGIC):
            self.compression = "gzip"
            yield from self._gunzip(self._raw(fh, first, READ_SIZE))
        elif first.startswith(ZSTD_MAGIC):
            self.compression = "zstd"
            yield from self._unzstd(self._raw(fh, first, ZSTD_READ_SIZE))
        else:
            yield from self._raw(fh, first, READ_SIZE)

    def _gunzip(self, raw: Iterator[bytes]) -> Iterator[bytes]:
        d = zlib.decompressobj(wbits=31)
        pending = False  # a member has started and not yet ended
        try:
            for block in raw:
                data = block
                while data:
                    pending = True
                    out = d.decompress(data, GZIP_OUT_MAX)
                    if out:
                        yield out
                    if d.eof:
                        pending = False
                        data = d.unused_data
                        d = zlib.decompressobj(wbits=31)
                        if data.strip(b"\x00") == b"":  # trailing zero padding some tools add
                            data = b""
                    else:
                        data = d.unconsumed_tail
                        if not data:
                            break
        except zlib.error as exc:
            self.error = f"corrupt gzip data: {exc}"
            return
        if pending:
            # drain what zlib still holds, then call the member truncated
            tail = d.flush()
            if tail:
                yield tail
            if not d.eof:
                self.error = "truncated gzip stream (the file ends inside compressed data)"

    def _unzstd(self, raw: Iterator[bytes]) -> Iterator[bytes]:
        dctx = zstandard.ZstdDecompressor()
        d = dctx.decompressobj()
        pending = False
        try:
            for block in raw:
                data = block
                while data:
                    pending = True
                    out = d.decompress(data)
                    if out:
                        yield out
                    if d.eof:
                        pending = False
                        data = d.unused_data
                        d = dctx.decompressobj()
                    else:
                        data = b""
        except zstandard.ZstdError as exc:
            self.error = f"corrupt zstd data: {exc}"
            return
        if pending:
            self.error = "truncated zstd stream (the file ends inside compressed data)"


# ----------------------------------------------------------------------------- records
_WS = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"


def records(stream: InputStream) -> Iterator[Record]:
    """Every record of one input, in file order (see the module docstring)."""
    chunks = stream.chunks()
    head = b""
    for block in chunks:
        head += block
        if head.lstrip(_WS) or len(head) > MAX_RECORD_BYTES:
            break
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    if b"\x00" in head[:BINARY_SNIFF]:
        # JSON text never holds a raw NUL byte: this is some binary file, not one bad line per 256 B
        for _ in chunks:
            pass
        yield _problem(1, None, "binary data (NUL bytes), not JSON text; file skipped", "binary")
        if stream.error:
            yield _problem(1, None, stream.error, "stream")
        return
    start = head.lstrip(_WS)[:1]
    if start == b"[":
        yield from _array_records(head, chunks, stream)
    else:
        yield from _line_records(head, chunks, stream)


def _line_records(head: bytes, chunks: Iterator[bytes], stream: InputStream) -> Iterator[Record]:
    """JSONL: one record per non-blank line; a line over MAX_RECORD_BYTES is a problem record."""
    line_no = 0
    seen = 0
    carry = b""
    skipping = False  # inside an over-long line, dropping bytes until its newline
    limit = MAX_RECORD_BYTES

    def blocks() -> Iterator[bytes]:
        if head:
            yield head
        yield from chunks

    for block in blocks():
        if skipping:
            nl = block.find(b"\n")
            if nl < 0:
                continue
            skipping = False
            block = block[nl + 1 :]
        parts = (carry + block).split(b"\n") if carry else block.split(b"\n")
        carry = parts.pop()
        for part in parts:
            line_no += 1
            if len(part) > limit:
                seen += 1
                yield _problem(line_no, None, f"line longer than {limit} bytes ({len(part)}); not read", "too_long")
            elif part.strip(_WS):
                seen += 1
                yield (line_no, None, part, None, None)
        if len(carry) > limit:
            line_no += 1
            seen += 1
            yield _problem(line_no, None, f"line longer than {limit} bytes; not read", "too_long")
            carry = b""
            skipping = True
    if carry.strip(_WS) and not skipping:
        line_no += 1
        seen += 1
        yield (line_no, None, carry, None, None)
    if stream.error:
        yield _problem(max(line_no, 1), None, stream.error, "stream")
    elif not seen:
        yield _problem(1, None, "empty input: no operations", "empty")


# Array splitting: a tokenizer that skips JSON strings and sees brackets, braces and commas, so
# each top-level element is cut out as its own text (and parsed on its own).
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.S)


def _array_records(head: bytes, chunks: Iterator[bytes], stream: InputStream) -> Iterator[Record]:
    """An audit-log JSON array: one record per element, with the line it starts on."""
    parts = [head]
    for block in chunks:
        parts.append(block)
    data = b"".join(parts)
    del parts
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    depth = 0
    seg_start = -1  # where the current top-level element's text starts
    entry = 0
    line = 1
    line_pos = 0  # newlines are counted up to here

    def line_at(pos: int) -> int:
        nonlocal line, line_pos
        line += data.count(b"\n", line_pos, pos)
        line_pos = pos
        return line

    def element(a: int, b: int) -> Record | None:
        nonlocal entry
        text = data[a:b].strip(_WS)
        if not text:
            return None
        first = a + (len(data[a:b]) - len(data[a:b].lstrip(_WS)))
        rec_line = line_at(first)
        idx = entry
        entry += 1
        if len(text) > MAX_RECORD_BYTES:
            return _problem(rec_line, idx, f"array element longer than {MAX_RECORD_BYTES} bytes; not read", "too_long")
        return (rec_line, idx, text, None, None)

    end = -1
    for m in _TOKENS.finditer(data):
        tok = m.group()
        c = tok[0]
        if c == 0x22:  # a string
            continue
        if c == 0x5B or c == 0x7B:  # [ {
            depth += 1
            if depth == 1:
                seg_start = m.end()
        elif c == 0x5D or c == 0x7D:  # ] }
            if depth == 1:
                rec = element(seg_start, m.start())
                if rec is not None:
                    yield rec
                depth = 0
                end = m.end()
                break
            depth -= 1
        elif depth == 1:  # a comma between elements
            rec = element(seg_start, m.start())
            if rec is None:
                yield _problem(line_at(m.start()), entry, "empty array element (stray comma)", "array")
            else:
                yield rec
            seg_start = m.end()
    if end < 0:
        # the array is never closed: the last element (if any) is cut off
        rec = element(seg_start, len(data)) if seg_start >= 0 else None
        if rec is not None and rec[RAW] is not None:
            yield _problem(rec[LINE], rec[ENTRY], "truncated: the array ends inside this element", "truncated")
        else:
            yield _problem(line_at(len(data)), None, "truncated: the array is not closed", "truncated")
    else:
        rest = data[end:].strip(_WS)
        if rest:
            pos = end + (len(data) - end - len(data[end:].lstrip(_WS)))
            yield _problem(line_at(pos), None, "unexpected data after the closing ']'", "array")
        elif entry == 0:
            yield _problem(1, None, "empty input: the array holds no operations", "empty")
    if stream.error:
        yield _problem(line_at(len(data)), None, stream.error, "stream")


# ----------------------------------------------------------------------------- sharding
_DID_PREFIX = b'{"did":"'


def did_hint(raw: bytes) -> bytes | None:
    """The DID of an export line or compact audit entry, read without parsing (or None).

    Only trusted when the line starts with `{"did":"` (both export formats and compact audit
    entries do) and the value has no escape, so it equals the UTF-8 of the parsed string.
    """
    if raw.startswith(_DID_PREFIX):
        j = raw.find(b'"', 8)
        if j > 8:
            h = raw[8:j]
            if b"\\" not in h:
                return h
    return None


__all__ = [
    "STDIN",
    "MAX_RECORD_BYTES",
    "UsageError",
    "Record",
    "LINE",
    "ENTRY",
    "RAW",
    "PROBLEM",
    "KIND",
    "InputStream",
    "check_paths",
    "input_size",
    "records",
    "did_hint",
]
