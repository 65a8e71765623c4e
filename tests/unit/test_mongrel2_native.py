"""The compiled parse_message (fleet/mongrel2/_codec.c) against its reference
(fleet.mongrel2.codec.parse_message): for every input, the same event with
the same header order, or the same ProtocolError with the same message.

The C code decodes only the common request and hands everything else to the
reference, so the inputs here are mostly near misses: valid requests in both
protocols, then the same requests cut, grown and mutated byte by byte. The
fuzz target (fuzz/targets.py, mongrel2) makes the same comparison on its
corpus and on the short atheris run.
"""

from __future__ import annotations

import random
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import native
from fleet.mongrel2 import codec
from fuzz.targets import COMPILED_PARSE, parse_outcome
from tests.support.encoders import ENCODERS, encode_tnetstring_request

pytestmark = pytest.mark.skipif(native.PURE, reason="FLEET_PURE is set: the compiled codec is not used")

SENDER = b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
HEADERS = {
    "REMOTE_ADDR": "127.0.0.1", "METHOD": "GET", "URL_SCHEME": "http", "PATTERN": "/t/",
    "QUERY": "a=1&b=two", "URI": "/t/hello?a=1&b=two", "VERSION": "HTTP/1.1", "PATH": "/t/hello",
    "host": "127.0.0.1:6780", "user-agent": "curl/7.88.1", "accept": ["*/*", "text/html"],
    "x-caf\xe9": "cr\xe8me",
}


def same(data: bytes) -> None:
    assert parse_outcome(COMPILED_PARSE, data) == parse_outcome(codec.parse_message, data), data


def test_the_compiled_twin_is_the_one_that_runs_and_its_limits_are_the_references() -> None:
    assert COMPILED_PARSE is not None, "fleet.mongrel2._codec was not built (pip install -e . builds it)"
    module = native.compiled("fleet.mongrel2._codec")
    for name in ("MAX_SENDER_BYTES", "MAX_CONN_ID_DIGITS", "MAX_LENGTH_DIGITS", "MAX_HEADERS_BYTES"):
        assert getattr(module, name) == getattr(codec, name), name


def test_the_common_request_is_decoded_in_c_and_the_rest_by_the_reference() -> None:
    request = COMPILED_PARSE(encode_tnetstring_request(SENDER, b"7", b"/t/hello", HEADERS, b"body"))
    assert list(request.headers.items()) == [(k, v) for k, v in HEADERS.items()]
    assert (request.sender, request.conn_id, request.path, request.body) == (SENDER, b"7", b"/t/hello", b"body")
    control = COMPILED_PARSE(encode_tnetstring_request(SENDER, b"7", b"@*", {"METHOD": "JSON"},
                                                       b'{"type":"disconnect"}'))
    assert isinstance(control, codec.Disconnect)
    with pytest.raises(codec.ProtocolError, match="no METHOD"):
        COMPILED_PARSE(encode_tnetstring_request(SENDER, b"7", b"/x", {"PATH": "/x"}, b""))


def test_header_names_seen_before_are_the_same_objects_and_the_cache_is_bounded() -> None:
    """Repeated names come back as one interned str (found by identity in the environ's
    caches); names past the cache's room, or longer than it keeps, still decode right."""
    first = COMPILED_PARSE(encode_tnetstring_request(SENDER, b"7", b"/t/hello", HEADERS, b""))
    again = COMPILED_PARSE(encode_tnetstring_request(SENDER, b"8", b"/t/hello", HEADERS, b""))
    for a, b in zip(first.headers, again.headers):
        assert a is b, a
    assert next(iter(first.headers)) is sys.intern("REMOTE_ADDR")
    many = {f"x-name-{i}": str(i) for i in range(2000)} | {"x-" + "long" * 40: "v", "METHOD": "GET"}
    for _ in range(2):  # the second time, the cache is full
        raw = encode_tnetstring_request(SENDER, b"9", b"/x", many, b"")
        assert dict(COMPILED_PARSE(raw).headers) == many
        same(raw)


text = st.text(st.characters(max_codepoint=255), max_size=12)
header_values = st.one_of(text, st.lists(text, min_size=0, max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(st.sampled_from(["METHOD", "PATH", "host", "accept", "DOWNLOAD_CREDITS", "x-a", "X_b",
                                             ""]) | text, header_values, max_size=6),
    path=st.sampled_from([b"/", b"/t/x", b"@*", b"@t", b"/a b"]),
    conn_id=st.sampled_from([b"0", b"7", b"01", b"12345678901", b"x"]),
    body=st.binary(max_size=8),
    encoder=st.sampled_from(ENCODERS),
)
def test_generated_messages_get_the_same_answer(headers, path, conn_id, body, encoder) -> None:
    same(encoder(SENDER, conn_id, path, headers, body))


def mutations(message: bytes, rng: random.Random):
    yield message
    for _ in range(300):
        at = rng.randrange(len(message))
        kind = rng.randrange(5)
        if kind == 0:
            yield message[:at]
        elif kind == 1:
            yield message[:at] + bytes([rng.randrange(256)]) + message[at + 1:]
        elif kind == 2:
            yield message[:at] + message[at + 1:]
        elif kind == 3:
            yield message[:at] + rng.choice([b"0", b"9", b":", b",", b"]", b"}", b" ", b"1:x,"]) + message[at:]
        else:
            yield message + message[at:]


@pytest.mark.parametrize("encoder", ENCODERS, ids=lambda e: e.__name__)
def test_mutated_requests_get_the_same_answer(encoder) -> None:
    rng = random.Random(encoder.__name__)
    for headers in (HEADERS, {"METHOD": "POST", "content-length": "3"}, {"METHOD": "GET", "x": ["a", "b"]}):
        for body in (b"", b"abc"):
            for data in mutations(encoder(SENDER, b"42", b"/t/form", headers, body), rng):
                same(data)


def test_non_bytes_input_goes_to_the_reference() -> None:
    message = encode_tnetstring_request(SENDER, b"7", b"/x", {"METHOD": "GET"}, b"")
    for data in (bytearray(message), memoryview(message)):
        same(data)
