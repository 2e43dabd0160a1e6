"""Streaming reader: a JSONL or JSON-array byte stream → one raw record per line / element.

This is the Ray-free, stdlib-only core of the conversation datasource: it turns a binary
file stream into :class:`RawRecord` objects, each holding one record's original text and,
when that text is valid JSON, its parsed value. Checking that a value is a conversation is
the caller's job; this module only splits and parses.

Contract:

* Format: :func:`detect_format` picks ``json_array`` when the first non-whitespace byte
  (after an optional UTF-8 BOM) is ``[``, else ``jsonl``.
* Bounded memory: the stream is read ``chunk_size`` bytes at a time and never held whole.
  At most about ``max_record_bytes + chunk_size`` bytes (plus a 1 MiB preview) are buffered,
  however large the file or a single record is.
* Never raises on bad data, only on I/O errors from the stream (and on invalid arguments).
  A record that cannot be used comes back with ``error`` set to a reason slug and ``detail``
  saying why:

  - ``bad_json``: a JSONL line that is not valid JSON, or a JSON-array element whose
    brackets balance but which does not parse (e.g. ``{"a": 1,}``) — reading goes on. A
    syntax error *between* elements (a missing comma, garbage after the closing ``]``)
    leaves the scanner unable to resynchronise reliably, so one record holds the rest of the
    file from there (its first 1 MiB) and reading stops.
  - ``non_utf8``: the record's bytes are not valid UTF-8; ``text`` is decoded with
    ``errors="backslashreplace"``. Reading goes on.
  - ``truncated``: a JSON array that ends before it is closed. Every complete element
    before the break is yielded normally, then one final record holds the broken tail
    (from the incomplete element's first non-whitespace byte to EOF, at most 1 MiB) under
    the index that element would have had; its text is empty when the file ends between
    elements. A JSONL file's cut last line is just ``bad_json``.
  - ``too_large``: one record longer than ``max_record_bytes``; ``text`` is its first
    1 MiB. Reading goes on with the next line / element.

* Indices: for JSONL the 0-based number of the non-blank line (blank and whitespace-only
  lines are skipped and use no index); for a JSON array the 0-based element index.
* JSONL ``text`` is the line without its line ending (``\\n`` or ``\\r\\n``); a JSON-array
  element's ``text`` is its exact source text. A UTF-8 BOM at the file start is ignored.
* ``value`` holds the parsed JSON (the datasource passes ``text`` on, and the tokenizer
  actors parse it again: Arrow cannot carry arbitrary Python values cheaply).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["PREVIEW_BYTES", "RawRecord", "detect_format", "iter_records"]

PREVIEW_BYTES = 1 << 20
"""How much of an oversized, truncated or unparseable tail a record's ``text`` keeps."""

_BOM = b"\xef\xbb\xbf"
_QUOTE = ord('"')
_OPEN_BRACE, _CLOSE_BRACE = ord("{"), ord("}")
_OPEN_BRACKET, _CLOSE_BRACKET = ord("["), ord("]")
_COMMA = ord(",")

_WS = re.compile(rb"[ \t\r\n]*")
# A bare scalar (number, true, false, null, or garbage json.loads will reject) runs to the
# next JSON whitespace or structural byte.
_SCALAR = re.compile(rb'[^ \t\r\n,\[\]{}"]*')
# The repeats below are bounded on purpose: CPython's re keeps backtracking state for every
# iteration of a repeated group, so an unbounded `(...)*` over a 60 MB element costs GBs.
# Hitting a bound only means the scan loop calls the regex again from where it stopped.
#
# The rest of a string from inside it: stops at the closing quote, at the end of the
# buffer, or at a backslash whose escaped byte has not been read yet.
_STR_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*){0,256}', re.DOTALL)
# Everything up to the next bracket or brace, stepping over complete strings (which may
# contain brackets, braces, commas and escaped quotes). Stops at a bracket, at a quote
# whose string does not close within the buffer (or has many escapes), or at a bound.
_SKIP = re.compile(rb'(?:[^"\[\]{}]+|"[^"\\]*(?:\\.[^"\\]*){0,256}"){0,256}', re.DOTALL)


@dataclass(frozen=True)
class RawRecord:
    """One record of a file, as read: its position, its original text and its parsed value.

    Attributes:
        index: 0-based position of the record within its file: for JSONL the number of the
            non-blank line, for a JSON array the element index.
        text: The record's original text: for JSONL the line without its line ending, for
            a JSON array the element's exact source text. Non-UTF-8 bytes are decoded with
            ``errors="backslashreplace"``; oversized and broken tails keep their first MiB.
        error: ``None`` when ``text`` is one complete JSON value that parsed; otherwise a
            reason slug: ``bad_json``, ``non_utf8``, ``truncated`` or ``too_large``.
        detail: Human-readable explanation when ``error`` is set.
        value: The parsed JSON value when ``error`` is ``None``.
    """

    index: int
    text: str
    error: str | None = None
    detail: str | None = None
    value: object = None


def detect_format(head: bytes) -> str:
    """Tells a JSON-array file from a JSONL file by its first bytes.

    Args:
        head: The first bytes of the file (enough to get past leading whitespace).

    Returns:
        ``"json_array"`` if the first non-whitespace byte after an optional UTF-8 BOM is
        ``[``, else ``"jsonl"`` (also for empty or whitespace-only input).
    """
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    return "json_array" if head.lstrip(b" \t\r\n")[:1] == b"[" else "jsonl"


def iter_records(stream: BinaryIO, chunk_size: int = 1 << 20, max_record_bytes: int = 64 << 20) -> Iterator[RawRecord]:
    """Yields every record of a JSONL file or a JSON-array file, streamed in chunks.

    Args:
        stream: A binary stream positioned at the start of the file.
        chunk_size: How many bytes to read at a time.
        max_record_bytes: Records longer than this come back as ``too_large`` errors and
            bound how much is buffered (about ``max_record_bytes + chunk_size``).

    Yields:
        One :class:`RawRecord` per non-blank JSONL line or per JSON-array element, in file
        order, plus the error records described in the module docstring.

    Raises:
        ValueError: if ``chunk_size`` or ``max_record_bytes`` is not positive.
        OSError: whatever the stream raises; bad data never raises.
    """
    if chunk_size < 1 or max_record_bytes < 1:
        raise ValueError(f"chunk_size and max_record_bytes must be positive, got {chunk_size}, {max_record_bytes}")
    buf = _Buffer(stream, chunk_size)
    while len(buf.data) < len(_BOM) and buf.fill(0):
        pass
    pos = len(_BOM) if buf.data.startswith(_BOM) else 0
    # Leading whitespace is dropped as it is read: it is blank lines in JSONL and ignorable
    # in an array, and a file of nothing but whitespace must not fill memory.
    while True:
        pos = _WS.match(buf.data, pos).end()
        if pos < len(buf.data) or not buf.fill(pos):
            break
        pos = 0
    if buf.data[pos : pos + 1] == b"[":
        yield from _iter_array(buf, pos + 1, max_record_bytes)
    else:
        yield from _iter_jsonl(buf, pos, max_record_bytes)


class _Buffer:
    """The unread window of the stream: ``data`` starts at file offset ``base``.

    ``data`` is a bytearray changed in place: dropping its front only moves its start and
    appending is amortised, so growing one large record by small chunks stays linear.
    """

    __slots__ = ("base", "chunk_size", "data", "eof", "stream")

    def __init__(self, stream: BinaryIO, chunk_size: int) -> None:
        self.stream = stream
        self.chunk_size = chunk_size
        self.data = bytearray()
        self.base = 0
        self.eof = False

    def read(self) -> bytes:
        """Reads the next chunk of the stream; ``b""`` at its end."""
        if self.eof:
            return b""
        chunk = self.stream.read(self.chunk_size) or b""
        if not chunk:
            self.eof = True
        return chunk

    def fill(self, keep: int) -> bool:
        """Drops ``data[:keep]`` and appends the next chunk.

        Callers shift their positions into ``data`` down by ``keep`` afterwards.

        Returns:
            ``False`` when the stream had nothing more.
        """
        chunk = self.read()
        del self.data[:keep]
        self.data += chunk
        self.base += keep
        return bool(chunk)

    def tail(self, start: int) -> tuple[bytes, bool]:
        """The first :data:`PREVIEW_BYTES` from ``data[start]`` on, reading on as needed.

        Returns:
            The bytes, and whether there was more after them.
        """
        raw = bytearray(self.data[start : start + PREVIEW_BYTES + 1])
        while len(raw) <= PREVIEW_BYTES:
            chunk = self.read()
            if not chunk:
                break
            raw += chunk[: PREVIEW_BYTES + 1 - len(raw)]
        return bytes(raw[:PREVIEW_BYTES]), len(raw) > PREVIEW_BYTES


def _preview(raw: bytes | bytearray, cut: bool) -> str:
    """Decodes a preview leniently, without a broken character where it was cut off."""
    if cut:
        return codecs.getincrementaldecoder("utf-8")("backslashreplace").decode(raw, final=False)
    return raw.decode("utf-8", "backslashreplace")


def _extend_preview(head: bytearray, data: bytearray, start: int, end: int) -> None:
    """Appends ``data[start:end]`` to ``head`` as far as :data:`PREVIEW_BYTES` allows."""
    room = PREVIEW_BYTES - len(head)
    if room > 0:
        head += data[start : min(end, start + room)]


def _parse(index: int, raw: bytes | bytearray, where: str) -> RawRecord:
    """Decodes (strict UTF-8) and parses one record's bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawRecord(index, raw.decode("utf-8", "backslashreplace"), "non_utf8", f"{where}: {e}")
    try:
        value = json.loads(text)
    except RecursionError:
        return RawRecord(index, text, "bad_json", f"{where}: JSON nested too deeply to parse")
    except ValueError as e:  # JSONDecodeError, and e.g. integers over the int digit limit
        return RawRecord(index, text, "bad_json", f"{where}: {e}")
    return RawRecord(index, text, value=value)


def _too_large(index: int, head: bytes | bytearray, size: int, limit: int, where: str) -> RawRecord:
    return RawRecord(
        index,
        _preview(head[:PREVIEW_BYTES], size > PREVIEW_BYTES),
        "too_large",
        f"{where}: {size} bytes is over max_record_bytes={limit}; text holds the first "
        f"{min(size, PREVIEW_BYTES)} bytes",
    )


def _iter_jsonl(buf: _Buffer, pos: int, max_record_bytes: int) -> Iterator[RawRecord]:
    index = 0
    start = scan = pos  # the line starts at `start`; no newline before `scan`
    # While skipping a line too large to buffer: its first bytes, its file offset, and its
    # last byte so far (to drop a `\r` whose `\n` comes in the next chunk).
    oversized: bytearray | None = None
    over_off = 0
    over_last = bytearray()
    while True:
        data = buf.data
        nl = data.find(b"\n", scan)
        if nl < 0:
            if buf.eof:
                if oversized is not None or start < len(data):
                    nl = len(data)  # a last line without a newline
                else:
                    return
            else:
                # +1: a `\r` waiting for its `\n` is no part of the record.
                if oversized is None and len(data) - start > max_record_bytes + 1:
                    oversized, over_off = bytearray(), buf.base + start
                if oversized is not None:
                    _extend_preview(oversized, data, start, len(data))
                    over_last = data[-1:]
                    keep = len(data)
                    start = scan = 0
                else:
                    keep = start
                    scan = len(data) - keep
                    start = 0
                buf.fill(keep)
                continue
        if oversized is not None:
            _extend_preview(oversized, data, start, nl)
            ends_cr = (data[nl - 1 : nl] if nl > start else over_last) == b"\r"
            size = buf.base + nl - over_off - ends_cr
            yield _too_large(index, bytes(oversized[:size]), size, max_record_bytes, f"line at byte {over_off}")
            index += 1
            oversized = None
        else:
            line = data[start:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line and not line.isspace():
                where = f"line at byte {buf.base + start}"
                if len(line) > max_record_bytes:
                    yield _too_large(index, line, len(line), max_record_bytes, where)
                else:
                    yield _parse(index, line, where)
                index += 1
        if nl >= len(data):
            return
        start = scan = nl + 1


def _iter_array(buf: _Buffer, pos: int, max_record_bytes: int) -> Iterator[RawRecord]:
    """Scans the elements of a JSON array whose ``[`` ends just before ``buf.data[pos]``."""
    index = 0
    first = True  # no element seen yet, so `]` may close an empty array
    while True:
        # Before an element: skip whitespace.
        data = buf.data
        pos = _WS.match(data, pos).end()
        if pos >= len(data):
            if not buf.fill(pos):
                after = "'['" if first else "','"
                yield _truncated(buf, index, b"", False, f"expected an element after {after}")
                return
            pos = 0
            continue
        c = data[pos]
        if c == _CLOSE_BRACKET and first:
            pos += 1
            break
        if c in (_COMMA, _CLOSE_BRACKET, _CLOSE_BRACE):
            yield _rest_is_bad(buf, index, pos, f"byte {buf.base + pos}: expected an element, found {_show(c)}")
            return

        # Inside an element: find its end, tracking strings and nesting depth.
        start = pos
        elem_off = buf.base + start
        # Once the element is too large to keep buffering: its first bytes. Bytes before
        # `start` are then already in `head` and dropped from the buffer.
        head: bytearray | None = None
        scalar = c not in (_OPEN_BRACE, _OPEN_BRACKET, _QUOTE)
        depth = 0
        # A string element is scanned from inside it: _SKIP would step over its end.
        in_str = c == _QUOTE
        if in_str:
            pos += 1
        n = len(data)
        while True:
            if scalar:
                pos = _SCALAR.match(data, pos).end()
                if pos < n:
                    break
            elif in_str:
                pos = _STR_REST.match(data, pos).end()
                if pos < n:
                    if data[pos] == _QUOTE:
                        pos += 1
                        in_str = False
                        if depth == 0:  # the element is a string
                            break
                        continue
                    if pos + 1 < n:  # stopped on an escape only because of the repeat bound
                        continue
            else:
                pos = _SKIP.match(data, pos).end()
                if pos < n:
                    c = data[pos]
                    pos += 1
                    if c == _QUOTE:
                        in_str = True
                    elif c in (_OPEN_BRACE, _OPEN_BRACKET):
                        depth += 1
                    elif c in (_CLOSE_BRACE, _CLOSE_BRACKET):
                        depth -= 1
                        if depth == 0:
                            break
                    continue
            # The element goes on past the buffer: read more.
            if head is None and pos - start > max_record_bytes:
                head = bytearray()
            if head is not None:
                _extend_preview(head, data, start, pos)
                start = pos
            keep = start
            more = buf.fill(keep)
            pos -= keep
            start -= keep
            data = buf.data
            n = len(data)
            if not more:
                # A scalar cut by EOF (`[1, 2`) may look complete, but with the array left
                # open it is the broken tail all the same.
                if head is not None:
                    _extend_preview(head, data, start, len(data))
                    raw = bytes(head)
                else:
                    raw = data[start : start + PREVIEW_BYTES]
                cut = buf.base + len(data) - elem_off > PREVIEW_BYTES
                yield _truncated(buf, index, raw, cut, f"element {index} at byte {elem_off} is incomplete")
                return

        size = buf.base + pos - elem_off
        where = f"element {index} at byte {elem_off}"
        if head is not None:
            _extend_preview(head, data, start, pos)
            yield _too_large(index, bytes(head), size, max_record_bytes, where)
        elif size > max_record_bytes:
            yield _too_large(index, data[start : start + PREVIEW_BYTES], size, max_record_bytes, where)
        else:
            # The scanner found the element's end, so it is still in step: a parse failure here
            # (e.g. a trailing comma inside an object) costs this element only, not the rest.
            yield _parse(index, data[start:pos], where)

        # After an element: expect `,` or `]`.
        while True:
            data = buf.data
            pos = _WS.match(data, pos).end()
            if pos < len(data):
                break
            if not buf.fill(pos):
                yield _truncated(buf, index + 1, b"", False, f"expected ',' or ']' after element {index}")
                return
            pos = 0
        c = data[pos]
        index += 1
        first = False
        pos += 1
        if c == _CLOSE_BRACKET:
            break
        if c != _COMMA:
            what = f"byte {buf.base + pos - 1}: expected ',' or ']' after element {index - 1}, found {_show(c)}"
            yield _rest_is_bad(buf, index, pos - 1, what)
            return

    # After the closing `]`: only whitespace may follow.
    while True:
        pos = _WS.match(buf.data, pos).end()
        if pos < len(buf.data):
            what = f"byte {buf.base + pos}: unexpected data after the closing ']' of the JSON array"
            yield _rest_is_bad(buf, index, pos, what, resync=False)
            return
        if not buf.fill(pos):
            return
        pos = 0


def _show(c: int) -> str:
    return repr(chr(c)) if c < 0x80 else f"byte 0x{c:02x}"


def _truncated(buf: _Buffer, index: int, raw: bytes | bytearray, cut: bool, what: str) -> RawRecord:
    size = buf.base + len(buf.data)
    detail = f"the file ends at byte {size} before the JSON array is closed: {what}"
    if cut:
        detail += f"; text holds the first {PREVIEW_BYTES} bytes of it"
    return RawRecord(index, _preview(raw, cut), "truncated", detail)


def _rest_is_bad(buf: _Buffer, index: int, start: int, what: str, resync: bool = True) -> RawRecord:
    """The ``bad_json`` record that ends an array: the rest of the file from ``data[start]``."""
    raw, cut = buf.tail(start)
    if resync:
        what += "; the reader cannot resynchronise after a syntax error in a JSON array, so"
    detail = f"{what}; this record holds the rest of the file"
    if cut:
        detail += f" (its first {PREVIEW_BYTES} bytes)"
    return RawRecord(index, _preview(raw, cut), "bad_json", detail)
