"""Round trips of generated messages that the codec tests do not already cover.

test_mongrel2.py round-trips requests (both protocols), control messages and
reply framing; test_cluster_protocol.py round-trips one sample per kind. Here:
every cluster message kind generated over its whole field ranges (signed,
unsigned, and across a key rotation), Mongrel2 extended control replies, and
upload messages as Mongrel2 emits them through parse_message and check_upload.
"""

from __future__ import annotations

import os
import re
import tempfile

import tnetstring
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fleet.cluster import protocol as cp
from fleet.cluster.protocol import Keyring, decode, encode
from fleet.mongrel2.codec import Request, encode_ctl, parse_message
from fleet.mongrel2.uploads import UploadDone, UploadPolicy, UploadStarted, check_upload

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0
KEY_OLD, KEY_NEW = bytes([1]) * 32, bytes([2]) * 32

# --- cluster messages ---------------------------------------------------------------


def one_line(max_size: int) -> st.SearchStrategy[str]:
    """Text a peer may send: no surrogates (msgpack's str is UTF-8), no control characters."""
    return st.text(st.characters(blacklist_categories=("Cs",)), max_size=min(max_size, 60)).filter(
        lambda text: cp._CONTROL.search(text) is None
    )


scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
    | st.binary(max_size=12)
)


def plain(depth: int) -> st.SearchStrategy:
    """msgpack's plain data, nested at most `depth` levels (the protocol allows MAX_DEPTH in all)."""
    if depth == 0:
        return scalars
    inner = plain(depth - 1)
    return scalars | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


counters = st.integers(0, cp.MAX_COUNTER)
addresses = st.tuples(one_line(cp.MAX_HOST_LEN), st.integers(0, 65535))
envelopes = st.fixed_dictionaries({
    "cluster": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True),
    "node_id": st.binary(min_size=16, max_size=16),
    "boot_id": st.binary(min_size=16, max_size=16),
    "seq": counters,
    "timestamp": st.floats(-cp.TIMESTAMP_WINDOW, cp.TIMESTAMP_WINDOW).map(lambda skew: NOW + skew),
})


@st.composite
def heartbeats(draw: st.DrawFn) -> dict:
    total = draw(st.integers(0, cp.MAX_WORKERS))
    return dict(
        role=draw(st.sampled_from(cp.ROLES)), state=draw(st.sampled_from(cp.HEARTBEAT_STATES)),
        generation=draw(counters), workers_total=total, workers_ready=draw(st.integers(0, total)),
        requests_served=draw(counters),
        requests_per_second=draw(st.floats(0, 1e12, allow_nan=False, allow_infinity=False)),
        rss=draw(counters), hostname=draw(one_line(cp.MAX_HOST_LEN).filter(bool)),
        address=draw(addresses), app_version=draw(st.none() | one_line(cp.MAX_APP_VERSION_LEN)),
        error=draw(st.none() | one_line(cp.MAX_ERROR_LEN)),
    )


BODIES = {
    cp.Announce: st.fixed_dictionaries({
        "generation": counters,
        "config": st.dictionaries(st.text(max_size=10), plain(3), max_size=6),
        "address": addresses,
        "members": st.lists(st.lists(scalars, min_size=9, max_size=9), max_size=3),
    }),
    cp.ConfigRequest: st.just({}),
    cp.Heartbeat: heartbeats(),
    cp.Reload: st.fixed_dictionaries({
        "command_id": st.binary(min_size=16, max_size=16),
        "generation": st.integers(1, cp.MAX_COUNTER),
        "batch": st.none() | st.integers(1, cp.MAX_WORKERS),
    }),
    cp.Log: st.fixed_dictionaries({
        "level": st.sampled_from(cp.LOG_LEVELS), "text": one_line(cp.MAX_LOG_LINE),
    }),
    cp.Leave: st.just({}),
}
messages = st.sampled_from(list(BODIES)).flatmap(
    lambda kind: st.builds(lambda env, body: kind(**env, **body), envelopes, BODIES[kind])
)
keyrings = st.sampled_from([Keyring([]), Keyring([KEY_OLD]), Keyring([KEY_NEW, KEY_OLD])])


@FAST
@given(message=messages, keyring=keyrings)
def test_generated_cluster_messages_round_trip(message: cp.Message, keyring: Keyring) -> None:
    try:
        datagram = encode(message, keyring)
    except cp.TooLarge:
        assume(False)  # a generated configuration too big for one datagram
    decoded = decode(datagram, keyring, NOW, cluster=message.cluster)
    assert decoded == message
    assert type(decoded) is type(message)
    assert encode(decoded, keyring) == datagram


@settings(FAST, max_examples=50)  # six encode/decode pairs each
@given(message=messages)
def test_generated_messages_cross_every_step_of_a_key_rotation(message: cp.Message) -> None:
    """Keyring's documented rotation: at each step every pair of hosts still understands each other."""
    steps = [[KEY_OLD], [KEY_OLD, KEY_NEW], [KEY_NEW, KEY_OLD], [KEY_NEW]]
    try:
        encode(message, Keyring([KEY_OLD]))
    except cp.TooLarge:
        assume(False)
    for before, after in zip(steps, steps[1:]):  # hosts part-way through one step
        for sender, receiver in [(before, after), (after, before)]:
            datagram = encode(message, Keyring(sender))
            assert decode(datagram, Keyring(receiver), NOW, cluster=message.cluster) == message


# --- Mongrel2 extended control replies --------------------------------------------------

REPLY = re.compile(rb"([A-Za-z0-9-]+) (\d+):X (\d+), (.*)\Z", re.S)
ctl_values = st.recursive(
    st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10) | st.booleans() | st.none(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def _str_to_bytes(value: object) -> object:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        return {_str_to_bytes(k): _str_to_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_to_bytes(v) for v in value]
    return value


@settings(FAST, max_examples=100)
@given(
    sender=st.from_regex(rb"[A-Za-z0-9-]{1,40}", fullmatch=True),
    conn_id=st.integers(0, 2**31 - 1).map(lambda i: str(i).encode()),
    key=st.text(max_size=10),
    args=st.dictionaries(st.text(max_size=8), ctl_values, max_size=4),
)
def test_encode_ctl_round_trips(sender: bytes, conn_id: bytes, key: str, args: dict) -> None:
    match = REPLY.fullmatch(encode_ctl(sender, conn_id, key, args))
    assert match is not None
    assert (match[1], match[3]) == (sender, conn_id)
    assert int(match[2]) == len(b"X " + conn_id)
    assert tnetstring.loads(match[4]) == [key.encode(), _str_to_bytes(args)]


# --- uploads as Mongrel2 emits them -------------------------------------------------------


def _tnetstring_message(headers: dict[str, str]) -> bytes:
    items = b"".join(tnetstring.dumps(k.encode()) + tnetstring.dumps(v.encode()) for k, v in headers.items())
    return b"34f9 43 /t/up %d:%s}0:," % (len(items), items)


def _json_message(headers: dict[str, str]) -> bytes:
    payload = ("{" + ",".join(f'"{k}":"{v}"' for k, v in headers.items()) + "}").encode()
    return b"34f9 43 /t/up %d:%s,0:," % (len(payload), payload)


@settings(FAST, max_examples=60)
@given(
    suffix=st.from_regex(r"[A-Za-z0-9]{6}", fullmatch=True),
    size=st.integers(20481, 70000),
    chunked=st.booleans(),
    done=st.booleans(),
    encoder=st.sampled_from([_tnetstring_message, _json_message]),
)
def test_generated_upload_messages_are_accepted(suffix, size, chunked, done, encoder) -> None:
    """Start and done messages as Mongrel2 writes them, for a real mkstemp-named file."""
    with tempfile.TemporaryDirectory() as chroot:
        os.mkdir(os.path.join(chroot, "tmp"))
        name = f"tmp/mongrel2.upload.{suffix}"
        with open(os.path.join(chroot, name), "wb") as file:
            file.write(b"u" * size)
        headers = {"REMOTE_ADDR": "127.0.0.1", "METHOD": "POST", "VERSION": "HTTP/1.1",
                   "PATH": "/t/up", "x-mongrel2-upload-start": name, "host": "localhost"}
        headers.update({"transfer-encoding": "chunked"} if chunked else {"content-length": str(size)})
        if done:
            headers["x-mongrel2-upload-done"] = name
        request = parse_message(encoder(headers))
        assert isinstance(request, Request) and request.headers == headers
        result = check_upload(request, UploadPolicy(chroot=chroot))
        if done:
            assert result == UploadDone(os.path.join(os.path.realpath(chroot), name), size)
        else:
            assert result == UploadStarted(name)
