"""Fuzz targets: one function per target, bytes in, nothing out.

A target returns normally when the code under test accepted the input or
refused it with its typed error (ProtocolError, UploadRejected,
ClusterProtocolError). Any other exception is a crash, and so is a broken
invariant (an ``assert`` here): what was accepted must be usable and must
survive a round trip. No atheris import, so the test suite replays corpora
through the same functions.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from fleet import native
from fleet.cluster import protocol as cp
from fleet.cluster.protocol import ClusterProtocolError, Keyring, ReplayGuard
from fleet.mongrel2 import codec as mongrel2
from fleet.mongrel2 import uploads
from fleet.mongrel2.codec import Control, Credits, Disconnect, ProtocolError, Request
from fleet.mongrel2.uploads import UploadDone, UploadPolicy, UploadRejected, UploadStarted
from tests.support.encoders import ENCODERS, message_of

# --- Mongrel2 requests -----------------------------------------------------------------


# The compiled parse_message (fleet/mongrel2/_codec.c), or None when it does not run.
COMPILED_PARSE = native.twin("fleet.mongrel2._codec", "parse_message", None)


def parse_outcome(parse: Callable[[bytes], object], data: bytes) -> tuple:
    """Everything observable of one parse: the event, its header order, or the error and its message."""
    try:
        event = parse(data)
    except ProtocolError as error:
        return ("ProtocolError", str(error))
    headers = list(event.headers.items()) if isinstance(event, Request) else None
    return (type(event).__name__, event, headers)


def mongrel2_request(data: bytes) -> None:
    """parse_message and peek_route on any bytes, cross-checked.

    The compiled parse_message, when built, must give exactly what the
    reference gives. Accepted requests must agree with the step-by-step
    framing (_split_checked), with peek_route, with every Request accessor,
    with the reply encoders, and must re-encode in both protocols to the same
    Request.
    """
    if COMPILED_PARSE is not None:
        assert parse_outcome(COMPILED_PARSE, data) == parse_outcome(mongrel2.parse_message, data)
    try:
        event = mongrel2.parse_message(data)
    except ProtocolError:
        event = None
    try:
        route = mongrel2.peek_route(data)
    except ProtocolError:
        route = None
    if event is None:
        return
    is_control = isinstance(event, (Disconnect, Credits, Control))
    assert route == (event.sender, event.conn_id, is_control), (route, event)
    # A sender and conn id that parse must be answerable.
    mongrel2.encode_response(event.sender, [event.conn_id], b"x")
    mongrel2.encode_ctl(event.sender, event.conn_id, "ctl", {"cancel": 1})
    if is_control:
        if isinstance(event, Credits):
            assert 0 <= event.credits <= mongrel2.MAX_CREDITS
        return
    assert isinstance(event, Request)
    sender, conn_id, path, headers, body = mongrel2._split_checked(data)
    assert (sender, conn_id, path, headers, body) == (
        event.sender, event.conn_id, event.path, event.headers, event.body
    ), "fast path and step-by-step framing disagree"
    _check_request_accessors(event)
    for encode in ENCODERS:
        again = mongrel2.parse_message(message_of(event, encode))
        assert again == event, (encode.__name__, again, event)


def _check_request_accessors(request: Request) -> None:
    for name, value in request.headers.items():
        assert type(name) is str
        values = value if type(value) is list else [value]
        assert values and all(type(v) is str for v in values), (name, value)
        for text in (name, *values):
            text.encode("latin-1")  # PEP 3333: every str must be latin-1
        request.header(name)
    assert type(request.method) is str
    # Every accessor must work on every request the codec accepts.
    _ = (request.version, request.upload_start, request.upload_done, request.download_credits,
         request.is_jssocket, request.is_websocket)
    request.should_close()


def _latin1(text: str) -> bytes:
    return text.encode("latin-1")


# --- uploads ---------------------------------------------------------------------------

UPLOAD_SIZE = 25000  # over the default limits.content_length (20480)
UPLOAD_STORE_SIZE = 30000  # the file of the custom temp_store policy


def make_upload_tree(root: Path) -> list[UploadPolicy]:
    """A chroot with real uploads and the traps a forger would aim at; the policies to try.

    Genuine: tmp/mongrel2.upload.LJoc1e (UPLOAD_SIZE bytes), .empty0 (0),
    var/up/upload.AbCdEfGh and mongrel2.upload.Rooted for other temp_stores.
    Traps: symlinks (to an upload, out of the chroot, to /dev/null), a FIFO,
    a directory, names mkstemp cannot make, a nested directory, directory
    symlinks in and out of the chroot, and a matching name outside.
    """
    chroot = root / "chroot"
    store = chroot / "tmp"
    (store / "sub").mkdir(parents=True)
    (chroot / "var" / "up").mkdir(parents=True)
    (root / "outside").mkdir()
    payload = bytes(range(256)) * (UPLOAD_STORE_SIZE // 256 + 1)
    for path, size in [
        (store / "mongrel2.upload.LJoc1e", UPLOAD_SIZE),
        (store / "mongrel2.upload.empty0", 0),
        (store / "mongrel2.upload.seven77", UPLOAD_SIZE),  # 7 chars: not mkstemp's 6
        (store / "notes.txt", UPLOAD_SIZE),
        (store / "sub" / "mongrel2.upload.Nested", UPLOAD_SIZE),
        (chroot / "mongrel2.upload.Rooted", UPLOAD_SIZE),
        (chroot / "var" / "up" / "upload.AbCdEfGh", UPLOAD_STORE_SIZE),
        (root / "outside" / "mongrel2.upload.Secret", UPLOAD_SIZE),
    ]:
        path.write_bytes(payload[:size])
    (store / "mongrel2.upload.linkA1").symlink_to("mongrel2.upload.LJoc1e")
    (store / "mongrel2.upload.linkB2").symlink_to("../../outside/mongrel2.upload.Secret")
    (store / "mongrel2.upload.devnul").symlink_to("/dev/null")
    os.mkfifo(store / "mongrel2.upload.fifo00")
    (store / "mongrel2.upload.dir000").mkdir()
    (chroot / "tmpl").symlink_to("tmp")
    (chroot / "escape").symlink_to("../outside")
    (root / "chroot-link").symlink_to("chroot")
    return [
        UploadPolicy(chroot=None),
        UploadPolicy(chroot=str(chroot)),
        UploadPolicy(chroot=str(chroot), temp_store="/var/up/upload.XXXXXXXX", content_length_limit=0),
        UploadPolicy(chroot=str(chroot) + "/", temp_store="mongrel2.upload.XXXXXX"),
        UploadPolicy(chroot=str(root / "chroot-link")),  # a symlinked chroot
    ]


def upload_request(data: bytes) -> tuple[int, Request]:
    """(policy index, request) from fuzz bytes: a readable format for a corpus.

    Byte 0 picks the policy; the rest, as latin-1, is ``name: value`` lines,
    an empty line, then the body. A repeated name becomes a list, as
    Mongrel2 sends repeated headers. METHOD is POST unless given.
    """
    text = data[1:].decode("latin-1")
    head, _, body = text.partition("\n\n")
    headers: dict[str, str | list[str]] = {"METHOD": "POST"}
    seen: set[str] = set()
    for line in head.split("\n"):
        name, colon, value = line.partition(":")
        if not colon:
            continue
        value = value.removeprefix(" ")
        if name in seen:
            old = headers[name]
            headers[name] = [*old, value] if type(old) is list else [old, value]
        else:
            headers[name] = value
            seen.add(name)
    return (data[0] if data else 0), Request(b"fuzz", b"1", b"/up", headers, _latin1(body))


def make_upload_target(policies: list[UploadPolicy]) -> Callable[[bytes], None]:
    def upload_check(data: bytes) -> None:
        """check_upload on a forged or genuine request in a real chroot, then open_upload.

        Whatever is accepted must be a regular, non-symlink, mkstemp-named file
        directly in the real temp_store directory, of the announced size.
        """
        choice, request = upload_request(data)
        policy = policies[choice % len(policies)]
        try:
            result = uploads.check_upload(request, policy)
        except UploadRejected:
            return
        if result is None:
            headers = request.headers
            assert uploads.START_HEADER not in headers and uploads.DONE_HEADER not in headers
            return
        assert policy.chroot is not None
        start = request.headers[uploads.START_HEADER]
        assert type(start) is str
        real = uploads._resolve(start, policy.chroot, policy.temp_store)
        _check_upload_file(real, policy)
        if isinstance(result, UploadStarted):
            assert result.path == start
            return
        assert isinstance(result, UploadDone) and result.real_path == real
        assert os.lstat(real).st_size == result.length
        with uploads.open_upload(result) as upload:
            assert os.fstat(upload.fileno()).st_ino == os.lstat(real).st_ino
            assert len(upload.read()) == result.length

    return upload_check


def _check_upload_file(real: str, policy: UploadPolicy) -> None:
    assert policy.chroot is not None
    store = os.path.realpath(
        os.path.join(policy.chroot, os.path.dirname(policy.temp_store).lstrip("/"))
    )
    chroot = os.path.realpath(policy.chroot)
    assert os.path.realpath(real) == real, real
    assert os.path.dirname(real) == store, real
    assert os.path.commonpath([chroot, real]) == chroot, real
    assert uploads._mkstemp_name(policy.temp_store).fullmatch(os.path.basename(real)), real
    assert stat.S_ISREG(os.lstat(real).st_mode), real


# --- cluster datagrams ---------------------------------------------------------------------

CLUSTER = "prod"
NOW = 1_700_000_000.0
KEY = bytes(range(32))  # the fuzz harness's own key, known so it can sign
KEYRING = Keyring([KEY])
UNSIGNED = Keyring([])


def cluster_datagram(data: bytes) -> None:
    """decode() of any bytes, by a host without a key and by one with a key."""
    for keyring in (UNSIGNED, KEYRING):
        try:
            message = cp.decode(data, keyring, NOW, cluster=CLUSTER)
        except ClusterProtocolError:
            continue
        _check_message(message, keyring)


def signed_datagram(kind: int, payload: bytes, keyring: Keyring = KEYRING) -> bytes:
    """A datagram with a valid header and MAC (keyring's first key) around any payload."""
    head = cp._HEAD.pack(cp.MAGIC, cp.PROTOCOL_VERSION, kind, cp.cluster_tag(CLUSTER),
                         keyring.signing_key_id)
    return head + keyring.sign(head + payload) + payload


def cluster_signed(data: bytes) -> None:
    """Byte 0 is the kind, the rest the payload; signed with the known key so it
    gets past the MAC to msgpack and the field checks. The same payload
    unsigned, to a host without a key, must give the same outcome."""
    kind, payload = (data[0], data[1:]) if data else (0, b"")
    outcomes = []
    for keyring in (KEYRING, UNSIGNED):
        try:
            message = cp.decode(signed_datagram(kind, payload, keyring), keyring, NOW, cluster=CLUSTER)
        except (cp.BadSignature, cp.Unsigned) as error:
            raise AssertionError(f"a correctly signed datagram was refused: {error}") from None
        except ClusterProtocolError as error:
            outcomes.append((type(error), str(error)))
            continue
        _check_message(message, keyring)
        outcomes.append(message)
    signed, unsigned = outcomes
    if isinstance(signed, tuple) or isinstance(unsigned, tuple):
        assert signed == unsigned, (signed, unsigned)
    else:  # messages holding NaN are never ==; their encodings are
        assert cp.encode(signed, UNSIGNED) == cp.encode(unsigned, UNSIGNED)


def _check_message(message: cp.Message, keyring: Keyring) -> None:
    """A decoded message re-encodes, decodes again and re-encodes to the same bytes."""
    assert type(message) is cp.MESSAGE_TYPES[message.KIND]
    try:
        datagram = cp.encode(message, keyring)
    except cp.TooLarge:
        return  # msgpack may re-encode compact input larger (float32 -> float64)
    again = cp.decode(datagram, keyring, NOW, cluster=CLUSTER)
    assert cp.encode(again, keyring) == datagram
    ReplayGuard().admit(again, NOW)


# --- registry --------------------------------------------------------------------------------


def build(name: str, scratch: Path | None = None) -> Callable[[bytes], None]:
    """The target called ``name``; the uploads target builds its tree in ``scratch``."""
    if name == "uploads":
        if scratch is None:
            raise ValueError("the uploads target needs a scratch directory")
        return make_upload_target(make_upload_tree(scratch))
    return TARGETS[name]


TARGETS: dict[str, Callable[[bytes], None]] = {
    "mongrel2": mongrel2_request,
    "cluster_datagram": cluster_datagram,
    "cluster_signed": cluster_signed,
}
NAMES = ("mongrel2", "uploads", "cluster_datagram", "cluster_signed")
