"""The cluster codec: round trips, authentication, replay, and bytes that must never crash it."""

from __future__ import annotations

import base64
import math
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.cluster import protocol as cp
from fleet.cluster.protocol import (
    Announce,
    BadSignature,
    ClusterProtocolError,
    ConfigRequest,
    Heartbeat,
    Keyring,
    Kind,
    Leave,
    Log,
    Malformed,
    Origin,
    Reload,
    Replayed,
    ReplayGuard,
    Stale,
    TooLarge,
    Unsigned,
    UnsupportedVersion,
    WrongCluster,
    decode,
    encode,
    keygen,
    parse_key_file,
)
from fleet.config import Endpoint, HandlerConfig

CLUSTER = "prod"
NOW = 1_700_000_000.0
NODE = bytes(range(16))
BOOT = bytes([0xB0]) * 16
KEY_OLD = bytes([1]) * 32
KEY_NEW = bytes([2]) * 32
UNSIGNED = Keyring([])
CONFIG = HandlerConfig(
    endpoints=(Endpoint("tcp://10.0.0.1:9999", "tcp://10.0.0.1:9998"),),
    app="app:application", processes=4, threads=8, extra={"nested": {"a": [1, 2.5, None, b"x"]}},
).to_dict()
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(FAST, max_examples=50)  # structured strategies cost more per example

ENVELOPE = dict(cluster=CLUSTER, node_id=NODE, boot_id=BOOT, seq=1, timestamp=NOW)
HEARTBEAT_BODY = dict(
    role="node", state="ready", generation=3, workers_ready=7, workers_total=8,
    requests_served=12345, requests_per_second=41.5, rss=200 * 2**20, hostname="web-1",
    address=("10.0.0.7", 7000), app_version="1.4.2", error=None,
)

SAMPLES = [
    pytest.param(Announce(**ENVELOPE, generation=3, config=CONFIG, address=("10.0.0.1", 7000)), id="announce"),
    pytest.param(ConfigRequest(**ENVELOPE), id="config_request"),
    pytest.param(Heartbeat(**ENVELOPE, **HEARTBEAT_BODY), id="heartbeat"),
    pytest.param(Heartbeat(**ENVELOPE, **{**HEARTBEAT_BODY, "role": "master", "state": "degraded",
                                          "app_version": None, "error": "ImportError: no module app"}),
                 id="heartbeat_degraded"),
    pytest.param(Reload(**ENVELOPE, command_id=bytes(16), generation=4, batch=2), id="reload"),
    pytest.param(Reload(**ENVELOPE, command_id=b"c" * 16, generation=4), id="reload_default_batch"),
    pytest.param(Log(**ENVELOPE, level="warning", text="disk is 91% full\ton /srv"), id="log"),
    pytest.param(Leave(**ENVELOPE), id="leave"),
]


def frame(kind: int, payload: bytes, *, cluster: str = CLUSTER, version: int = cp.PROTOCOL_VERSION) -> bytes:
    """An unsigned datagram around arbitrary payload bytes."""
    head = struct.pack(">3sBB4s4s", cp.MAGIC, version, kind, cp.cluster_tag(cluster), bytes(4))
    return head + bytes(32) + payload


def envelope_payload(body: object, *, head: list | None = None) -> bytes:
    return msgpack.packb((head or [CLUSTER, NODE, BOOT, 1, NOW]) + [body], use_bin_type=True)


def only_protocol_errors(datagram: bytes, keyring: Keyring = UNSIGNED) -> None:
    """decode() may succeed or raise a ClusterProtocolError; anything else fails the test."""
    try:
        decode(datagram, keyring, NOW, cluster=CLUSTER)
    except ClusterProtocolError:
        pass


# --- Round trips -------------------------------------------------------------


@pytest.mark.parametrize("keyring", [UNSIGNED, Keyring([KEY_OLD])], ids=["unsigned", "signed"])
@pytest.mark.parametrize("message", SAMPLES)
def test_every_kind_round_trips(message: cp.Message, keyring: Keyring) -> None:
    datagram = encode(message, keyring)
    assert len(datagram) <= cp.MAX_DATAGRAM
    assert decode(datagram, keyring, NOW, cluster=CLUSTER) == message


def test_header_layout() -> None:
    keyring = Keyring([KEY_OLD])
    datagram = encode(SAMPLES[2].values[0], keyring)
    assert datagram[:3] == b"FLT" and datagram[3] == 1 and datagram[4] == Kind.HEARTBEAT
    assert datagram[5:9] == cp.cluster_tag(CLUSTER)
    assert datagram[9:13] == cp.key_id(KEY_OLD)
    assert len(datagram[13:45]) == 32 and datagram[13:45] != bytes(32)
    unsigned = encode(SAMPLES[2].values[0], UNSIGNED)
    assert unsigned[9:45] == bytes(36)
    assert msgpack.unpackb(unsigned[45:])[:5] == [CLUSTER, NODE, BOOT, 1, NOW]


def test_announce_carries_a_handler_config() -> None:
    message = Announce(**ENVELOPE, generation=1, config=CONFIG, address=("10.0.0.1", 7000))
    decoded = decode(encode(message, UNSIGNED), UNSIGNED, NOW, cluster=CLUSTER)
    assert HandlerConfig.from_dict(decoded.config) == HandlerConfig.from_dict(CONFIG)


def test_origin_numbers_messages() -> None:
    origin = Origin(CLUSTER, NODE, BOOT)
    first = origin.make(Heartbeat, NOW, **HEARTBEAT_BODY)
    second = origin.make(Leave, NOW + 1)
    assert (first.seq, second.seq, second.timestamp) == (1, 2, NOW + 1)


def test_unknown_body_keys_are_ignored_and_optional_ones_default() -> None:
    body = {"command_id": b"c" * 16, "generation": 2, "from_the_future": [1, 2]}
    message = decode(frame(Kind.RELOAD, envelope_payload(body)), UNSIGNED, NOW, cluster=CLUSTER)
    assert isinstance(message, Reload) and message.batch is None


def test_heartbeat_at_its_limits_fits_one_frame() -> None:
    longest = Heartbeat(**{**ENVELOPE, "cluster": "c" * cp.MAX_CLUSTER_NAME, "seq": cp.MAX_COUNTER}, **{
        **HEARTBEAT_BODY, "hostname": "h" * cp.MAX_HOST_LEN, "address": ("a" * 45, 65535),
        "app_version": "v" * cp.MAX_APP_VERSION_LEN, "error": "e" * cp.MAX_ERROR_LEN,
        "requests_served": cp.MAX_COUNTER, "rss": cp.MAX_COUNTER, "generation": cp.MAX_COUNTER,
    })
    assert len(encode(longest, Keyring([KEY_OLD]))) <= cp.SAFE_DATAGRAM


# --- Construction validates ------------------------------------------------------


@pytest.mark.parametrize("kind, changes, fragment", [
    (Leave, {"node_id": b"short"}, "node_id"),
    (Leave, {"boot_id": "x" * 16}, "boot_id"),
    (Leave, {"seq": -1}, "seq"),
    (Leave, {"seq": True}, "seq"),
    (Leave, {"timestamp": math.inf}, "timestamp"),
    (Leave, {"timestamp": "now"}, "timestamp"),
    (Leave, {"cluster": ""}, "cluster"),
    (Leave, {"cluster": "a b"}, "cluster"),
    (Leave, {"cluster": "x" * 65}, "cluster"),
    (Heartbeat, {"role": "boss"}, "role"),
    (Heartbeat, {"state": "dead"}, "state"),
    (Heartbeat, {"workers_ready": 9}, "workers_ready"),
    (Heartbeat, {"requests_per_second": math.nan}, "requests_per_second"),
    (Heartbeat, {"rss": -5}, "rss"),
    (Heartbeat, {"hostname": ""}, "hostname"),
    (Heartbeat, {"hostname": "h" * 254}, "hostname"),
    (Heartbeat, {"error": "line one\nFAKE: line two"}, "error"),
    (Heartbeat, {"error": "\x1b[2J"}, "error"),
    (Heartbeat, {"address": ("10.0.0.7", 70000)}, "port"),
    (Heartbeat, {"address": "10.0.0.7:7000"}, "address"),
    (Reload, {"generation": 0}, "generation"),
    (Reload, {"batch": 0}, "batch"),
    (Reload, {"command_id": b"x"}, "command_id"),
    (Log, {"level": "loud"}, "level"),
    (Log, {"text": "x" * (cp.MAX_LOG_LINE + 1)}, "text"),
    (Announce, {"config": {1: "int key"}}, "keys must be str"),
    (Announce, {"config": {"a": object()}}, "cannot travel"),
    (Announce, {"config": {"a": [[[[[[[1]]]]]]]}}, "nested deeper"),
    (Announce, {"config": {"a": list(range(300))}}, "more than 256"),
    (Announce, {"config": [("a", 1)]}, "dict"),
])
def test_construction_refuses(kind: type, changes: dict, fragment: str) -> None:
    base = {
        Leave: {},
        Heartbeat: HEARTBEAT_BODY,
        Reload: {"command_id": bytes(16), "generation": 2},
        Log: {"level": "info", "text": "hi"},
        Announce: {"generation": 1, "config": {}, "address": ("10.0.0.1", 7000)},
    }[kind]
    with pytest.raises(ValueError, match=fragment):
        kind(**{**ENVELOPE, **base, **changes})


def test_encode_refuses_an_oversized_configuration() -> None:
    big = dict(CONFIG, extra={f"k{i}": "v" * 200 for i in range(60)})
    with pytest.raises(TooLarge, match="over the 8192-byte cluster limit; shrink the configuration"):
        encode(Announce(**ENVELOPE, generation=1, config=big, address=("10.0.0.1", 7000)), UNSIGNED)


# --- Authentication ----------------------------------------------------------------


def test_wrong_key_is_rejected() -> None:
    datagram = encode(SAMPLES[2].values[0], Keyring([KEY_OLD]))
    with pytest.raises(BadSignature, match="unknown key"):
        decode(datagram, Keyring([KEY_NEW]), NOW, cluster=CLUSTER)


def test_forged_mac_under_a_known_key_id_is_rejected() -> None:
    datagram = bytearray(encode(SAMPLES[2].values[0], Keyring([KEY_OLD])))
    datagram[20] ^= 1
    with pytest.raises(BadSignature, match="MAC does not match"):
        decode(bytes(datagram), Keyring([KEY_OLD]), NOW, cluster=CLUSTER)


def test_unsigned_is_rejected_when_a_key_is_configured() -> None:
    datagram = encode(SAMPLES[2].values[0], UNSIGNED)
    with pytest.raises(Unsigned):
        decode(datagram, Keyring([KEY_OLD]), NOW, cluster=CLUSTER)


def test_signed_is_rejected_by_a_host_without_keys() -> None:
    datagram = encode(SAMPLES[2].values[0], Keyring([KEY_OLD]))
    with pytest.raises(BadSignature, match="no cluster key"):
        decode(datagram, UNSIGNED, NOW, cluster=CLUSTER)


def test_key_rotation_without_downtime() -> None:
    message = SAMPLES[2].values[0]
    old_only, both_old_first = Keyring([KEY_OLD]), Keyring([KEY_OLD, KEY_NEW])
    both_new_first, new_only = Keyring([KEY_NEW, KEY_OLD]), Keyring([KEY_NEW])
    # Step 1, the new key installed second: old-signed traffic flows both ways.
    assert decode(encode(message, old_only), both_old_first, NOW, cluster=CLUSTER) == message
    assert decode(encode(message, both_old_first), old_only, NOW, cluster=CLUSTER) == message
    # Step 2, the new key signs: hosts still on step 1 verify it, and the old key still verifies.
    assert decode(encode(message, both_new_first), both_old_first, NOW, cluster=CLUSTER) == message
    assert decode(encode(message, both_old_first), both_new_first, NOW, cluster=CLUSTER) == message
    # Step 3, the old key removed: its messages are rejected.
    assert decode(encode(message, both_new_first), new_only, NOW, cluster=CLUSTER) == message
    with pytest.raises(BadSignature):
        decode(encode(message, old_only), new_only, NOW, cluster=CLUSTER)


@pytest.mark.parametrize("message", SAMPLES[2:5])
def test_every_signed_byte_matters(message: cp.Message) -> None:
    """Flip any bit, the kind and version bytes included: never accepted."""
    keyring = Keyring([KEY_OLD])
    datagram = encode(message, keyring)
    for index in range(len(datagram)):
        for mask in (0x01, 0x80):
            mutated = bytearray(datagram)
            mutated[index] ^= mask
            with pytest.raises(ClusterProtocolError):
                decode(bytes(mutated), keyring, NOW, cluster=CLUSTER)


def test_kind_is_authenticated() -> None:
    keyring = Keyring([KEY_OLD])
    datagram = bytearray(encode(Leave(**ENVELOPE), keyring))
    datagram[4] = Kind.CONFIG_REQUEST  # same (empty) body: only the MAC can tell
    with pytest.raises(BadSignature):
        decode(bytes(datagram), keyring, NOW, cluster=CLUSTER)


def test_mac_is_checked_before_msgpack_sees_the_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    datagram = bytearray(encode(SAMPLES[2].values[0], Keyring([KEY_OLD])))
    datagram[-1] ^= 0xFF

    def unpackb(*args: object, **kwargs: object) -> None:
        raise AssertionError("msgpack parsed an unauthenticated payload")

    monkeypatch.setattr(cp.msgpack, "unpackb", unpackb)
    with pytest.raises(BadSignature):
        decode(bytes(datagram), Keyring([KEY_OLD]), NOW, cluster=CLUSTER)


def test_keyring_repr_shows_ids_not_keys() -> None:
    text = repr(Keyring([KEY_OLD, KEY_NEW]))
    assert cp.key_id(KEY_OLD).hex() in text
    assert KEY_OLD.hex() not in text and repr(KEY_OLD) not in text


@pytest.mark.parametrize("keys, fragment", [
    ([b"short"], "at least 16"),
    (["text key of enough length"], "at least 16"),
])
def test_keyring_refuses_weak_keys(keys: list, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Keyring(keys)


# --- Keys in files -------------------------------------------------------------


def test_keygen_output_parses_and_differs() -> None:
    first, second = keygen(), keygen()
    assert first != second and first.endswith("\n")
    assert len(base64.b64decode(first)) == cp.KEY_LEN
    assert len(parse_key_file(first)) == 1


def test_key_file_with_comments_first_key_signs() -> None:
    new, old = base64.b64encode(KEY_NEW).decode(), base64.b64encode(KEY_OLD).decode()
    text = f"# fleet cluster keys\n\n{new}  # current\n   {old}\n# {'x' * 10}\n"
    keyring = parse_key_file(text)
    assert keyring.key_ids == (cp.key_id(KEY_NEW), cp.key_id(KEY_OLD))
    assert keyring.signing_key_id == cp.key_id(KEY_NEW)


@pytest.mark.parametrize("text, fragment", [
    ("", "no key"),
    ("# only a comment\n\n", "no key"),
    ("not-base64!!\n", "line 1: not base64"),
    (f"# c\n{base64.b64encode(b'x' * 16).decode()}\n", "line 2: the key is 16 bytes, expected 32"),
    ("ключ\n", "line 1: not base64"),
])
def test_bad_key_files(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_key_file(text)
    message = str(error.value)
    assert fragment in message and "\n" not in message
    assert "not-base64" not in message  # never echo a line: it may be a secret


# --- Framing errors ---------------------------------------------------------------


@pytest.mark.parametrize("datagram, error", [
    (b"", Malformed),
    (b"FLT", Malformed),
    (b"GET / HTTP/1.1\r\n\r\n", Malformed),
    (b"FLT\x02" + bytes(60), UnsupportedVersion),
    (b"FLT\x01" + bytes(10), Malformed),
    (b"FLT\x01" + bytes(cp.MAX_DATAGRAM), TooLarge),
    (frame(Kind.LEAVE, b"", cluster="staging"), WrongCluster),
    (frame(99, envelope_payload({})), Malformed),
    (frame(Kind.LEAVE, b""), Malformed),
    (frame(Kind.LEAVE, b"\xc1"), Malformed),
    (frame(Kind.LEAVE, envelope_payload({}) + b"\x00"), Malformed),
    (frame(Kind.LEAVE, msgpack.packb({"not": "an array"})), Malformed),
    (frame(Kind.LEAVE, msgpack.packb([CLUSTER, NODE, BOOT, 1])), Malformed),
    (frame(Kind.LEAVE, envelope_payload([])), Malformed),
    (frame(Kind.LEAVE, b"\xdd\xff\xff\xff\xff"), Malformed),  # forged 4-billion-item array
    (frame(Kind.LEAVE, b"\x91" * 2000 + b"\xc0"), Malformed),  # nested past msgpack's stack
    (frame(Kind.LEAVE, envelope_payload({}, head=["staging", NODE, BOOT, 1, NOW])), WrongCluster),
    (frame(Kind.LEAVE, envelope_payload({}, head=[CLUSTER, NODE, BOOT, -1, NOW])), Malformed),
    (frame(Kind.LEAVE, envelope_payload({}, head=[CLUSTER, "node", BOOT, 1, NOW])), Malformed),
    (frame(Kind.LOG, envelope_payload({"level": "info"})), Malformed),
    (frame(Kind.LOG, envelope_payload({"level": "info", "text": b"bytes"})), Malformed),
    (frame(Kind.LOG, envelope_payload({1: 2})), Malformed),
    (frame(Kind.LOG, envelope_payload({"level": "info", "text": msgpack.ExtType(1, b"")})), Malformed),
    (frame(Kind.LOG, envelope_payload({"level": "info", "text": "x"})[:-1] + b"\xd4\x01\x00"), Malformed),
    (frame(Kind.LOG, b"\x96\xa4prod\xc4\x10" + NODE + b"\xc4\x10" + BOOT + b"\x01\xcb"
           + struct.pack(">d", NOW) + b"\x82\xa5level\xa4info\xa4text\xa2\xff\xfe"), Malformed),
    (frame(Kind.ANNOUNCE, envelope_payload({"generation": 1, "address": ["h", 1],
                                            "config": {"a": [[[[[[1]]]]]]}})), Malformed),
])
def test_bad_datagrams(datagram: bytes, error: type) -> None:
    with pytest.raises(error):
        decode(datagram, UNSIGNED, NOW, cluster=CLUSTER)


def test_every_truncation_is_refused() -> None:
    for keyring in (UNSIGNED, Keyring([KEY_OLD])):
        datagram = encode(SAMPLES[0].values[0], keyring)
        for length in range(len(datagram)):
            with pytest.raises(ClusterProtocolError):
                decode(datagram[:length], keyring, NOW, cluster=CLUSTER)


@pytest.mark.parametrize("skew", [-31.0, 31.0, -3600.0, NOW])
def test_stale_timestamps_are_refused(skew: float) -> None:
    message = Leave(**{**ENVELOPE, "timestamp": max(0.0, NOW + skew)})
    with pytest.raises(Stale):
        decode(encode(message, UNSIGNED), UNSIGNED, NOW, cluster=CLUSTER)


@pytest.mark.parametrize("skew", [-29.9, 0.0, 29.9])
def test_timestamps_within_the_window_pass(skew: float) -> None:
    message = Leave(**{**ENVELOPE, "timestamp": NOW + skew})
    assert decode(encode(message, UNSIGNED), UNSIGNED, NOW, cluster=CLUSTER) == message


# --- Replay protection ---------------------------------------------------------------


def leave(seq: int, *, boot: bytes = BOOT, node: bytes = NODE, at: float = NOW) -> Leave:
    return Leave(**{**ENVELOPE, "seq": seq, "boot_id": boot, "node_id": node, "timestamp": at})


def test_replay_is_refused_and_order_enforced() -> None:
    guard = ReplayGuard()
    guard.admit(leave(5), NOW)
    for seq in (5, 4, 0):
        with pytest.raises(Replayed):
            guard.check(leave(seq), NOW)
    guard.admit(leave(6), NOW)


def test_check_alone_changes_nothing() -> None:
    """State advances only via accept(), i.e. for authenticated messages."""
    guard = ReplayGuard()
    guard.check(leave(9), NOW)
    guard.admit(leave(1), NOW)
    assert len(guard) == 1


def test_restart_is_not_a_replay() -> None:
    guard = ReplayGuard()
    guard.admit(leave(100), NOW)
    guard.admit(leave(1, boot=b"\x02" * 16), NOW + 1)
    with pytest.raises(Replayed):  # the old boot's history is still protected
        guard.check(leave(100), NOW + 2)


def test_guard_refuses_stale_messages() -> None:
    with pytest.raises(Stale):
        ReplayGuard().check(leave(1, at=NOW - 40), NOW)


def test_guard_forgets_silent_boots_only_once_their_datagrams_are_stale() -> None:
    guard = ReplayGuard(window=30.0)
    guard.admit(leave(7), NOW)
    guard.accept(leave(1, boot=b"\x03" * 16), NOW + 89)
    assert len(guard) == 2
    guard.accept(leave(1, boot=b"\x04" * 16), NOW + 91)
    assert len(guard) == 2  # the first boot is gone, and its datagrams are now stale anyway
    with pytest.raises(Stale):
        guard.check(leave(7, at=NOW + 30), NOW + 91)
    with pytest.raises(ValueError, match="twice the window"):
        ReplayGuard(window=30.0, memory=59.0)


def test_guard_memory_is_capped() -> None:
    guard = ReplayGuard(max_boots=3)
    for index in range(10):
        guard.accept(leave(1, boot=bytes([index]) * 16), NOW + index * 0.01)
    assert len(guard) == 3
    with pytest.raises(Replayed):  # the most recent boots are the ones kept
        guard.check(leave(1, boot=bytes([9]) * 16), NOW)


# --- Fuzz ------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=300))
def test_fuzz_raw_bytes(data: bytes) -> None:
    only_protocol_errors(data)
    only_protocol_errors(data, Keyring([KEY_OLD]))


@FAST
@given(st.sampled_from(list(Kind) + [0, 7, 255]), st.binary(max_size=300))
def test_fuzz_payload_behind_a_valid_header(kind: int, payload: bytes) -> None:
    only_protocol_errors(frame(kind, payload))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@QUICK
@given(st.sampled_from(list(Kind)), st.lists(msgpack_values, max_size=7))
def test_fuzz_structured_payloads(kind: int, items: list) -> None:
    only_protocol_errors(frame(kind, msgpack.packb(items, use_bin_type=True)))


@FAST
@given(st.sampled_from([p.values[0] for p in SAMPLES]), st.data())
def test_fuzz_fields_of_valid_messages(message: cp.Message, data: st.DataObject) -> None:
    """Valid messages with some fields swapped for arbitrary values: reaches every validator."""
    items = [message.cluster, message.node_id, message.boot_id, message.seq, message.timestamp]
    for index in data.draw(st.sets(st.integers(0, 4), max_size=2)):
        items[index] = data.draw(msgpack_values)
    body = message.body()
    names = sorted(body) + ["other"]
    for name in data.draw(st.sets(st.sampled_from(names), max_size=3)):
        if data.draw(st.booleans()):
            body[name] = data.draw(msgpack_values)
        else:
            body.pop(name, None)
    only_protocol_errors(frame(message.KIND, envelope_payload(body, head=items)))


@FAST
@given(st.sampled_from([p.values[0] for p in SAMPLES]), st.booleans(),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 10_000))
def test_fuzz_mutated_datagrams(message: cp.Message, signed: bool, edits: list, cut: int) -> None:
    keyring = Keyring([KEY_OLD]) if signed else UNSIGNED
    datagram = bytearray(encode(message, keyring))
    for position, value in edits:
        datagram[position % len(datagram)] = value
    mutated = bytes(datagram[: max(cut, cp.HEADER_LEN // 2)])
    only_protocol_errors(mutated, keyring)
    if signed and mutated != encode(message, keyring):
        with pytest.raises(ClusterProtocolError):
            decode(mutated, keyring, NOW, cluster=CLUSTER)
