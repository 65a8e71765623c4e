"""Tests for Mongrel2 temp-file upload validation (fleet.mongrel2.uploads).

Each test builds a fake chroot under tmp_path holding Mongrel2's temp store
``tmp/`` with a real upload file, then forges or mangles the upload headers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.mongrel2.codec import Request
from fleet.mongrel2.uploads import (
    UploadDone,
    UploadGone,
    UploadPolicy,
    UploadRejected,
    UploadStarted,
    check_upload,
    discard_upload,
    open_upload,
)

NAME = "mongrel2.upload.LJoc1e"
HEADER_PATH = f"tmp/{NAME}"  # as Mongrel2 sends it: relative to the chroot
SIZE = 25000  # above the default limits.content_length of 20480
DATA = bytes(range(256)) * (SIZE // 256) + b"x" * (SIZE % 256)


@pytest.fixture
def chroot(tmp_path: Path) -> Path:
    root = tmp_path / "chroot"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / NAME).write_bytes(DATA)
    return root


@pytest.fixture
def policy(chroot: Path) -> UploadPolicy:
    return UploadPolicy(chroot=str(chroot))


def upload_request(
    start: object = HEADER_PATH,
    done: object = HEADER_PATH,
    *,
    content_length: object = str(SIZE),
    chunked: bool = False,
    body: bytes = b"",
) -> Request:
    headers: dict = {"METHOD": "POST", "VERSION": "HTTP/1.1", "PATH": "/t/up"}
    if start is not None:
        headers["x-mongrel2-upload-start"] = start
    if done is not None:
        headers["x-mongrel2-upload-done"] = done
    if content_length is not None:
        headers["content-length"] = content_length
    if chunked:
        headers["transfer-encoding"] = "chunked"
    return Request(b"34f9", b"43", b"/t/up", headers, body)


# --- accepted -------------------------------------------------------------------


def test_ordinary_request_is_none(policy: UploadPolicy) -> None:
    request = Request(b"s", b"1", b"/t/", {"METHOD": "POST", "content-length": "3"}, b"abc")
    assert check_upload(request, policy) is None
    assert check_upload(request, UploadPolicy(chroot=None)) is None


def test_start_message(policy: UploadPolicy) -> None:
    assert check_upload(upload_request(done=None), policy) == UploadStarted(path=HEADER_PATH)


def test_done_message(policy: UploadPolicy, chroot: Path) -> None:
    done = check_upload(upload_request(), policy)
    assert done == UploadDone(real_path=str((chroot / "tmp" / NAME).resolve()), length=SIZE)
    with open_upload(done) as f:
        assert f.read() == DATA


def test_absolute_looking_path(policy: UploadPolicy) -> None:
    path = "/" + HEADER_PATH
    assert isinstance(check_upload(upload_request(path, path), policy), UploadDone)


def test_chunked_uses_file_size(policy: UploadPolicy) -> None:
    done = check_upload(upload_request(content_length=None, chunked=True), policy)
    assert isinstance(done, UploadDone) and done.length == SIZE
    # A tiny chunked body also takes the upload path in Mongrel2.
    small = UploadPolicy(chroot=policy.chroot, content_length_limit=10**9)
    assert isinstance(check_upload(upload_request(content_length=None, chunked=True), small), UploadDone)
    started = check_upload(upload_request(done=None, content_length=None, chunked=True), small)
    assert started == UploadStarted(HEADER_PATH)


def test_chunked_with_other_encodings(policy: UploadPolicy) -> None:
    request = upload_request(content_length=None)
    request.headers["transfer-encoding"] = "gzip, Chunked"
    assert isinstance(check_upload(request, policy), UploadDone)


def test_symlinked_temp_store_directory_is_fine(tmp_path: Path) -> None:
    """An admin may make the temp store dir a symlink: both sides resolve alike."""
    root = tmp_path / "root"
    (root / "real-tmp").mkdir(parents=True)
    (root / "tmp").symlink_to("real-tmp")
    (root / "real-tmp" / NAME).write_bytes(DATA)
    done = check_upload(upload_request(), UploadPolicy(chroot=str(root)))
    assert done == UploadDone(str((root / "real-tmp" / NAME).resolve()), SIZE)


def test_custom_temp_store(tmp_path: Path) -> None:
    (tmp_path / "var" / "up").mkdir(parents=True)
    (tmp_path / "var" / "up" / "body.AbCdEf12").write_bytes(DATA)
    policy = UploadPolicy(
        chroot=str(tmp_path), temp_store="/var/up/body.XXXXXXXX", content_length_limit=8192
    )
    path = "/var/up/body.AbCdEf12"
    assert isinstance(check_upload(upload_request(path, path), policy), UploadDone)
    (tmp_path / "var" / "up" / "body.AbCdEf").write_bytes(DATA)
    with pytest.raises(UploadRejected, match="does not match temp_store"):
        check_upload(upload_request("var/up/body.AbCdEf", "var/up/body.AbCdEf"), policy)


# --- rejected -------------------------------------------------------------------


def _reject(request: Request, policy: UploadPolicy, reason: str) -> None:
    with pytest.raises(UploadRejected) as info:
        check_upload(request, policy)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"start": None}, "upload header missing or repeated"),
        ({"start": [HEADER_PATH, HEADER_PATH]}, "upload header missing or repeated"),
        ({"done": [HEADER_PATH, HEADER_PATH]}, "upload header missing or repeated"),
        ({"done": "tmp/mongrel2.upload.Other1"}, "differs from upload-start"),
        ({"body": b"abc"}, "with a body"),
        ({"done": None, "body": b"abc"}, "with a body"),
        ({"content_length": None}, "without content-length or chunked"),
        ({"content_length": "20480"}, "within limits.content_length (20480)"),
        ({"content_length": "3"}, "within limits.content_length"),
        ({"done": None, "content_length": "100"}, "within limits.content_length"),
        ({"content_length": "abc"}, "invalid content-length 'abc'"),
        ({"content_length": "-30000"}, "invalid content-length"),
        ({"content_length": "\u0661\u0662"}, "invalid content-length"),
        ({"content_length": ["30000", "30000"]}, "invalid content-length"),
        ({"content_length": "9" * 40}, "invalid content-length"),
        ({"content_length": "30000"}, "incomplete upload: file has 25000 bytes, content-length is 30000"),
    ],
)
def test_rejected_requests(policy: UploadPolicy, kwargs: dict, reason: str) -> None:
    _reject(upload_request(**kwargs), policy, reason)


def test_doc_forgery_etc_passwd(policy: UploadPolicy) -> None:
    """The forgery the protocol doc observed: both headers, 3-byte body."""
    request = upload_request("/etc/passwd", "/etc/passwd", content_length="3", body=b"abc")
    _reject(request, policy, "with a body")
    # Even without the body tell-tale, the path gives it away.
    _reject(upload_request("/etc/passwd", "/etc/passwd"), policy, "not in the temp_store directory")


def test_uploads_disabled() -> None:
    _reject(upload_request(), UploadPolicy(chroot=None), "not enabled")
    _reject(upload_request(done=None), UploadPolicy(chroot=None), "not enabled")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc/passwd", "not in the temp_store directory"),
        ("../../../etc/passwd", "contains '..'"),
        ("tmp/../tmp/" + NAME, "contains '..'"),
        ("tmp/..", "contains '..'"),
        ("tmp/" + NAME + "\0", "NUL byte"),
        ("", "is empty"),
        ("/", "is empty"),
        ("tmp", "not in the temp_store directory"),
        ("tmp/", "not in the temp_store directory"),
        ("tmp/sub/mongrel2.upload.abcdef", "not in the temp_store directory"),
        (NAME, "not in the temp_store directory"),
        ("tmp/other.upload.abcdef", "does not match temp_store"),
        ("tmp/mongrel2.upload.abc", "does not match temp_store"),
        ("tmp/mongrel2.upload.abcdefg", "does not match temp_store"),
        ("tmp/mongrel2.upload.ab-def", "does not match temp_store"),
        ("tmp/mongrel2.upload.ab\u00e9def", "does not match temp_store"),
        ("tmp/mongrel2.upload.abcde\n", "does not match temp_store"),
        ("tmp/mongrel2.upload.", "does not match temp_store"),
    ],
)
def test_rejected_paths(policy: UploadPolicy, chroot: Path, path: str, reason: str) -> None:
    (chroot / "tmp" / "sub").mkdir()
    for name in ("sub/mongrel2.upload.abcdef", "other.upload.abcdef", "mongrel2.upload.abc"):
        (chroot / "tmp" / name).write_bytes(DATA)
    (chroot / NAME).write_bytes(DATA)
    _reject(upload_request(path, path), policy, reason)
    _reject(upload_request(path, None), policy, reason)  # the start message too


def test_symlink_to_outside(policy: UploadPolicy, chroot: Path) -> None:
    (chroot / "tmp" / "mongrel2.upload.SymLnk").symlink_to("/etc/passwd")
    path = "tmp/mongrel2.upload.SymLnk"
    _reject(upload_request(path, path), policy, "is a symlink")
    _reject(upload_request(path, None), policy, "is a symlink")


def test_symlink_to_another_upload(policy: UploadPolicy, chroot: Path) -> None:
    (chroot / "tmp" / "mongrel2.upload.SymLnk").symlink_to(NAME)
    path = "tmp/mongrel2.upload.SymLnk"
    _reject(upload_request(path, path), policy, "is a symlink")


def test_symlinked_parent_directory_escaping(policy: UploadPolicy, chroot: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mongrel2.upload.abcdef").write_bytes(DATA)
    (chroot / "tmp2").symlink_to(outside)
    path = "tmp2/mongrel2.upload.abcdef"
    _reject(upload_request(path, path), policy, "not in the temp_store directory")


def test_done_file_missing(policy: UploadPolicy) -> None:
    path = "tmp/mongrel2.upload.Gone12"
    _reject(upload_request(path, path), policy, "not accessible")
    # mkstemp made the file before Mongrel2 sent the start message.
    _reject(upload_request(path, None), policy, "not accessible")


def test_start_whose_file_is_gone_is_told_apart(policy: UploadPolicy) -> None:
    """Start and done can reach different workers: the done one may be served and its file
    deleted first. The worker ignores such a start (UploadGone) instead of answering 400
    (found by the cluster soak: stray 400s on uploads)."""
    path = "tmp/mongrel2.upload.Gone12"
    with pytest.raises(UploadGone):
        check_upload(upload_request(path, None), policy)
    with pytest.raises(UploadRejected) as info:  # a done message for a missing file is refused
        check_upload(upload_request(path, path), policy)
    assert not isinstance(info.value, UploadGone)


def test_done_not_a_regular_file(policy: UploadPolicy, chroot: Path) -> None:
    (chroot / "tmp" / "mongrel2.upload.Dir123").mkdir()
    os.mkfifo(chroot / "tmp" / "mongrel2.upload.Fifo12")
    for path in ("tmp/mongrel2.upload.Dir123", "tmp/mongrel2.upload.Fifo12"):
        _reject(upload_request(path, path, chunked=True, content_length=None), policy, "not a regular file")
        _reject(upload_request(path, None), policy, "not a regular file")


def test_chroot_of_the_wrong_server(tmp_path: Path) -> None:
    """A chroot without the upload (misconfiguration) rejects at the start message."""
    _reject(upload_request(done=None), UploadPolicy(chroot=str(tmp_path / "nowhere")), "not accessible")
    _reject(upload_request(), UploadPolicy(chroot=str(tmp_path)), "not accessible")


@pytest.mark.parametrize("temp_store", ["/tmp/upload", "/tmp/upload.XXXXX", "/tmp/XXXXXX/up"])
def test_policy_needs_mkstemp_template(temp_store: str) -> None:
    with pytest.raises(ValueError, match="mkstemp"):
        UploadPolicy(chroot="/", temp_store=temp_store)


# --- open_upload -----------------------------------------------------------------


def test_open_upload_symlink_swapped_in(policy: UploadPolicy, chroot: Path) -> None:
    done = check_upload(upload_request(), policy)
    target = chroot / "tmp" / NAME
    target.unlink()
    target.symlink_to("/etc/passwd")
    with pytest.raises(UploadRejected, match="cannot open"):
        open_upload(done)


def test_open_upload_fifo_swapped_in_does_not_block(policy: UploadPolicy, chroot: Path) -> None:
    done = check_upload(upload_request(), policy)
    target = chroot / "tmp" / NAME
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(UploadRejected, match="not a regular file"):
        open_upload(done)


def test_open_upload_size_changed(policy: UploadPolicy, chroot: Path) -> None:
    done = check_upload(upload_request(), policy)
    (chroot / "tmp" / NAME).write_bytes(b"short")
    with pytest.raises(UploadRejected, match="changed"):
        open_upload(done)


def test_open_upload_missing(tmp_path: Path) -> None:
    with pytest.raises(UploadRejected, match="cannot open"):
        open_upload(UploadDone(str(tmp_path / "nothing"), 1))


def test_open_upload_is_blocking_and_cloexec(policy: UploadPolicy) -> None:
    with open_upload(check_upload(upload_request(), policy)) as f:
        assert os.get_blocking(f.fileno())
        assert not os.get_inheritable(f.fileno())


# --- discarding the upload of a request no worker will serve -----------------------


def test_discard_deletes_a_genuine_done_upload(policy: UploadPolicy, chroot: Path) -> None:
    path = chroot / "tmp" / NAME
    assert discard_upload(upload_request(), policy) == str(path.resolve())
    assert not path.exists()
    assert discard_upload(upload_request(), policy) is None  # already gone: nothing to do


def test_discard_leaves_a_start_message_alone(policy: UploadPolicy, chroot: Path) -> None:
    """Mongrel2 may still be writing it; the done message follows to a worker."""
    assert discard_upload(upload_request(done=None), policy) is None
    assert (chroot / "tmp" / NAME).exists()


def test_discard_leaves_ordinary_requests_alone(policy: UploadPolicy) -> None:
    request = Request(b"s", b"1", b"/t/", {"METHOD": "POST", "content-length": "3"}, b"abc")
    assert discard_upload(request, policy) is None


def test_discard_never_deletes_what_a_forged_message_names(policy: UploadPolicy, chroot: Path) -> None:
    outside = chroot / "etc" / "passwd"
    outside.parent.mkdir()
    outside.write_text("root:x:0:0")
    inside_but_wrong_name = chroot / "tmp" / "precious.txt"
    inside_but_wrong_name.write_bytes(DATA)
    forged = [upload_request("etc/passwd", "etc/passwd", content_length="10"),
              upload_request("tmp/../etc/passwd", "tmp/../etc/passwd", content_length="10"),
              upload_request("tmp/precious.txt", "tmp/precious.txt"),
              upload_request(body=b"inline"),
              upload_request(content_length="100")]  # not the file's size
    for request in forged:
        assert discard_upload(request, policy) is None
    assert outside.exists() and inside_but_wrong_name.exists() and (chroot / "tmp" / NAME).exists()


def test_a_done_message_refused_as_its_start_was_says_so(policy: UploadPolicy, chroot: Path) -> None:
    """Direct mode hands the done message of a refused start to a worker too: the worker answers
    it again but logs the refusal once, at the start. Only path and file refusals repeat one."""
    (chroot / "tmp" / "mongrel2.upload.Dir123").mkdir()
    repeated = [("tmp/other.upload.abcdef", {}), ("/etc/passwd", {}),
                ("tmp/mongrel2.upload.Dir123", {"chunked": True, "content_length": None})]
    for path, framing in repeated:
        with pytest.raises(UploadRejected) as done:
            check_upload(upload_request(path, path, **framing), policy)
        with pytest.raises(UploadRejected) as start:
            check_upload(upload_request(path, None, **framing), policy)
        assert done.value.repeats_start and not start.value.repeats_start, path
    # Its own refusals: forged shapes, a missing file (a start that finds none is not logged), a short file.
    own = [upload_request(body=b"abc", content_length="3"), upload_request(done="tmp/other"),
           upload_request("tmp/mongrel2.upload.Gone12", "tmp/mongrel2.upload.Gone12"),
           upload_request(content_length="30000")]
    for message in own:
        with pytest.raises(UploadRejected) as done:
            check_upload(message, policy)
        assert not done.value.repeats_start, done.value
