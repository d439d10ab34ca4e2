"""The C++ JSONL line parser and UTF-8 check (csrc/json_lines.h) against Python's json module and
codecs, which are the reference: every line Python parses into an object with string values is
accepted with the same values; everything else is rejected with the right reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megafim._native import load

native = load("indexed_builder")
KEYS = ["text"]


def reference(line: bytes, keys: list[str]) -> tuple[str, list[bytes] | None]:
    """What the parser must answer, from Python's json (minus its extensions: NaN, Infinity, lone
    surrogates, which are not JSON / not encodable as UTF-8)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8", None
    try:
        obj = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, RecursionError):
        return "malformed_json", None
    if not isinstance(obj, dict):
        return "malformed_json", None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_utf8", None  # a lone surrogate escape somewhere
    if any(k not in obj for k in keys):
        return "missing_key", None
    if any(not isinstance(obj[k], str) for k in keys):
        return "not_a_string", None
    return "ok", [obj[k].encode("utf-8") for k in keys]


def check(line: bytes, keys: list[str] = KEYS) -> None:
    status, values, _ = native.parse_json_line(line, keys)
    assert (status, values) == reference(line, keys), line


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["text", "meta", "id", "t\u00e9xt"]) | st.text(max_size=4), json_values,
                           max_size=5),
       text=st.text(), ensure_ascii=st.booleans(), indent=st.sampled_from([None, " \t"]))
def test_valid_objects_match_python(obj, text, ensure_ascii, indent):
    obj = dict(obj, text=text) if text or "text" not in obj else obj
    line = json.dumps(obj, ensure_ascii=ensure_ascii, separators=(", ", ": ") if indent else (",", ":"))
    check(line.encode("utf-8"))
    check(line.encode("utf-8"), ["text", "meta"])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40) | st.text(alphabet='{}[]":,\\ u0aF1-.eE+tfrlsn\t\r', max_size=30).map(str.encode))
def test_arbitrary_bytes_match_python(line):
    check(line)
    check(b'{"text": "' + line + b'"}')
    check(b'{"text": "x", "k": ' + line + b"}")


@pytest.mark.parametrize("line,status", [
    (rb'{"text": "a\"b\\c\/d\b\f\n\r\t"}', "ok"),
    (rb'{"text": "\u00e9\u4e2d\ud83d\ude00"}', "ok"),               # BMP escapes and a surrogate pair
    (rb'{"text": "\ud83d"}', "invalid_utf8"),                       # lone high surrogate
    (rb'{"text": "\ude00x"}', "invalid_utf8"),                      # lone low surrogate
    (rb'{"text": "\ud83d\u0041"}', "invalid_utf8"),                 # high surrogate + non-surrogate
    (rb'{"text": "\u12"}', "malformed_json"),
    (rb'{"text": "\x"}', "malformed_json"),
    (b'{"text": "tab\there"}', "malformed_json"),                   # raw control character
    (b'{"text": "abc"', "malformed_json"),
    (b'{"text": "abc"} x', "malformed_json"),
    (b'{"text": "abc",}', "malformed_json"),
    (b'{"text": "a", "n": NaN}', "malformed_json"),
    (b'{"text": "a", "n": 01}', "malformed_json"),
    (b'{"text": "a", "n": 1.}', "malformed_json"),
    (b'{"text": "a", "n": -}', "malformed_json"),
    (b'{"text": "a", "n": [1, 2, {"x": [true, false, null]}]}', "ok"),
    (b'["text"]', "malformed_json"),
    (b'"text"', "malformed_json"),
    (b'{"other": "x"}', "missing_key"),
    (b'{"text": 5}', "not_a_string"),
    (b'{"text": ["a", "b"]}', "not_a_string"),
    (b'{"text": 5, "text": "later wins"}', "ok"),
    (rb'{"te\u0078t": "an escaped key"}', "ok"),
    (b'{"text": "x"}\r', "ok"),                                     # CRLF files leave a \r
    (b' \t{"text": "x"} ', "ok"),
    (b'{"text": "\xff"}', "invalid_utf8"),                         # raw invalid byte
    (b'{"text": "\xed\xa0\x80"}', "invalid_utf8"),                 # encoded surrogate
    (b'{"text": "\xc0\xaf"}', "invalid_utf8"),                     # overlong
    (b'{"text": "\xf4\x90\x80\x80"}', "invalid_utf8"),             # above U+10FFFF
    (b'\xef\xbb\xbf{"text": "bom"}', "malformed_json"),            # a BOM is not JSON
])
def test_cases(line, status):
    assert native.parse_json_line(line, KEYS)[0] == status
    check(line)


def test_deep_nesting_is_rejected_not_crashing():
    deep = b'{"text": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert native.parse_json_line(deep, KEYS)[0] == "malformed_json"
    ok = b'{"text": "x", "a": ' + b"[" * 200 + b"]" * 200 + b"}"
    assert native.parse_json_line(ok, KEYS)[0] == "ok"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=24))
def test_utf8_prefix_matches_python(data):
    try:
        data.decode("utf-8")
        expect = len(data)
    except UnicodeDecodeError as err:
        expect = err.start
    assert native.utf8_valid_prefix(data) == expect
