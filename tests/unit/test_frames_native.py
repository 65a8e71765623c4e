"""The link's framing in C (fleet/dispatch/_frames.c) against its reference
(fleet.dispatch.frames): the same bytes from encode, the same messages and
the same count of bytes used from decode, on well-formed streams cut
anywhere and on malformed ones (which the C hands to the reference)."""

from __future__ import annotations

import random
import struct
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import native
from fleet.dispatch import frames

pytestmark = pytest.mark.skipif(native.PURE, reason="FLEET_PURE is set: the compiled frames are not used")
COMPILED = native.compiled("fleet.dispatch._frames")


def outcome(function, *args) -> tuple:
    try:
        return ("ok", function(*args))
    except Exception as error:
        return ("error", type(error), str(error))


def decoded(decode, data, container) -> tuple:
    out = container()
    return outcome(decode, data, out), list(out)


def test_the_compiled_twin_is_built_and_used_by_the_link() -> None:
    from fleet.dispatch import link

    assert COMPILED is not None, "fleet.dispatch._frames was not built (pip install -e . builds it)"
    assert link.encode is COMPILED.encode and link.decode is COMPILED.decode


message_frames = st.lists(st.binary(max_size=40), max_size=4)


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(message_frames, max_size=6), cut=st.integers(min_value=0), seed=st.integers(0, 2**16))
def test_well_formed_streams_cut_anywhere_decode_alike(messages, cut, seed) -> None:
    stream = b"".join(frames.encode(m) for m in messages)
    for m in messages:
        assert COMPILED.encode(m) == frames.encode(m)
    cut = cut % (len(stream) + 1)
    for data in (stream, stream[:cut], bytearray(stream[:cut]), memoryview(stream)[:cut]):
        for container in (list, deque):
            assert decoded(COMPILED.decode, data, container) == decoded(frames.decode, data, container)


def test_malformed_messages_are_decoded_as_the_reference_decodes_them() -> None:
    rng = random.Random(7)
    good = frames.encode([b"Q\x00", b"raw request"]) + frames.encode([b"=\x00", b"42"])
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 3)):
            data[rng.randrange(len(data))] = rng.choice([0, 1, 3, 4, 5, 30, 255])
        data = bytes(data[:rng.randrange(len(data) + 1)])
        assert decoded(COMPILED.decode, data, list) == decoded(frames.decode, data, list), data


def test_odd_encode_arguments_go_to_the_reference() -> None:
    for argument in ([b"a", "not bytes"], (b"a", b"b"), [bytearray(b"a")], [b"x" * 10], []):
        assert outcome(COMPILED.encode, argument) == outcome(frames.encode, argument)
    assert struct.unpack("!I", COMPILED.encode([])[:4]) == (0,)
