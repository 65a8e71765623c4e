"""Validation of Mongrel2 temp-file uploads (protocol doc, section 5).

For a body over ``limits.content_length``, or any chunked body, Mongrel2
writes the body to an ``mkstemp`` file and sends two messages with empty
bodies: one with ``x-mongrel2-upload-start: PATH`` and, once the file is
complete, one with both ``x-mongrel2-upload-start`` and
``x-mongrel2-upload-done``. PATH is relative to Mongrel2's chroot.

A client can send both headers itself (``/etc/passwd`` arrived as a matching
pair), so a done message is trusted only if it could not have been forged:
empty body, a body size Mongrel2 would not have sent inline, and a path that
resolves to an mkstemp-named regular file in the temp-store directory.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass
from typing import BinaryIO

from fleet.config import HandlerConfig
from fleet.mongrel2.codec import Request

log = logging.getLogger("fleet.mongrel2")

START_HEADER = "x-mongrel2-upload-start"
DONE_HEADER = "x-mongrel2-upload-done"

#: glibc mkstemp replaces the trailing "XXXXXX" with characters of this set.
MKSTEMP_CHARS = "A-Za-z0-9"
#: mkstemp fails (EINVAL) unless the template ends in at least six X's.
MKSTEMP_MIN_XS = 6
#: A content-length with more digits than this is garbage (and bounds int()).
MAX_CONTENT_LENGTH_DIGITS = 19


class UploadRejected(ValueError):
    """A forged or unsafe upload message; str(e) is the reason, the worker answers 400.

    ``repeats_start``: a done message refused for its path or file, which its
    start message (same path, same file) was refused and logged for already.
    """

    repeats_start = False


class UploadGone(UploadRejected):
    """A start message (no done header) whose file no longer exists.

    The start and done messages of one upload can reach different workers (or
    hosts); the done one may have been served, and its file deleted, before the
    start one is looked at. Nothing to answer then: the done message did.
    """


@dataclass(frozen=True)
class UploadPolicy:
    """Where and when Mongrel2 writes uploads, as configured on that server."""

    # --mongrel2-chroot: the dir Mongrel2 chroots into (its cwd when not root); None: uploads refused
    chroot: str | None
    temp_store: str = "/tmp/mongrel2.upload.XXXXXX"  # Mongrel2's upload.temp_store, a path inside the chroot
    content_length_limit: int = 20480  # Mongrel2's limits.content_length

    @classmethod
    def of(cls, config: HandlerConfig) -> UploadPolicy:
        return cls(config.mongrel2_chroot, config.upload_store, config.content_length_limit)

    def __post_init__(self) -> None:
        name = os.path.basename(self.temp_store)
        if len(name) - len(name.rstrip("X")) < MKSTEMP_MIN_XS:
            raise ValueError(
                f"temp_store {self.temp_store!r} must end in {'X' * MKSTEMP_MIN_XS} (an mkstemp template)"
            )
        if self.content_length_limit < 0:
            raise ValueError("content_length_limit must be >= 0")


@dataclass(frozen=True)
class UploadStarted:
    """A genuine-looking start message: do not answer, wait for the done message.

    ``path`` is the header value as Mongrel2 sent it (relative to the chroot).
    """

    path: str


@dataclass(frozen=True)
class UploadDone:
    """A validated complete upload: the body is ``length`` bytes at ``real_path`` (host path).

    Mongrel2 never deletes it; the handler must unlink it when done.
    """

    real_path: str
    length: int


def check_upload(request: Request, policy: UploadPolicy) -> UploadStarted | UploadDone | None:
    """Classify ``request``: None for an ordinary request (no upload header at
    all), UploadStarted / UploadDone for genuine-looking upload messages.

    Raises UploadRejected with the reason for anything forged or unsafe.
    """
    headers = request.headers
    start = headers.get(START_HEADER)
    done = headers.get(DONE_HEADER)
    if start is None and done is None:
        return None
    if policy.chroot is None:
        raise UploadRejected("uploads are not enabled (no --mongrel2-chroot)")
    if not isinstance(start, str) or (done is not None and not isinstance(done, str)):
        raise UploadRejected("upload header missing or repeated (forged)")
    if done is not None and done != start:
        raise UploadRejected("upload-done path differs from upload-start path (forged)")
    if request.body:
        raise UploadRejected("upload message with a body (forged)")
    chunked, content_length = _body_framing(request, policy)

    # Past the framing check the message is Mongrel2's own (a client cannot make it
    # stream a body to a file), so a done message refused for its path or file had
    # its start message refused, and logged, for the same reason.
    try:
        real_path = _resolve(start, policy.chroot, policy.temp_store)
    except UploadRejected as error:
        error.repeats_start = done is not None
        raise
    # mkstemp creates the file before the start message is sent, so a missing
    # file means a forgery or a chroot that is not this Mongrel2's.
    try:
        st = os.lstat(real_path)
    except OSError as e:
        if done is None and e.errno == errno.ENOENT:
            raise UploadGone(f"upload file is not accessible: {e.strerror}") from None
        error = UploadRejected(f"upload file is not accessible: {e.strerror}")
        error.repeats_start = done is not None and e.errno != errno.ENOENT  # a missing start is not logged
        raise error from None
    if not stat.S_ISREG(st.st_mode):
        error = UploadRejected("upload path is not a regular file")
        error.repeats_start = done is not None
        raise error
    if done is None:
        return UploadStarted(path=start)
    if chunked:
        return UploadDone(real_path=real_path, length=st.st_size)
    if st.st_size != content_length:
        raise UploadRejected(
            f"incomplete upload: file has {st.st_size} bytes, content-length is {content_length}"
        )
    return UploadDone(real_path=real_path, length=content_length)


def open_upload(done: UploadDone) -> BinaryIO:
    """Open a validated upload for reading without following a symlink swapped in
    since the check; it must still be a regular file of ``done.length`` bytes."""
    # O_NONBLOCK: a FIFO swapped in must not block the open; cleared below.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(done.real_path, flags)
    except OSError as e:
        raise UploadRejected(f"cannot open upload file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UploadRejected("upload path is not a regular file")
        if st.st_size != done.length:
            raise UploadRejected(
                f"upload file changed: {st.st_size} bytes, expected {done.length}"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def remove_upload(done: UploadDone) -> None:
    """Delete a served upload's file (Mongrel2 never does); a failure is one warning."""
    try:
        os.unlink(done.real_path)
    except OSError as error:
        log.warning("could not delete upload %s: %s", done.real_path, error)


def discard_upload(request: Request, policy: UploadPolicy) -> str | None:
    """Delete the file of an upload-done request that no worker will serve (its
    worker died, or it was shed): Mongrel2 never deletes it. Only a file that
    passes the same checks as one about to be served is deleted, so a forged
    message cannot delete anything else. Returns the path deleted, if any."""
    try:
        upload = check_upload(request, policy)
    except UploadRejected:
        return None
    if not isinstance(upload, UploadDone):
        return None  # not an upload, or only its start: the done message follows
    try:
        os.unlink(upload.real_path)
    except FileNotFoundError:
        return None
    return upload.real_path


def _body_framing(request: Request, policy: UploadPolicy) -> tuple[bool, int | None]:
    """(chunked, content_length); rejects a body Mongrel2 would have sent inline."""
    encoding = request.headers.get("transfer-encoding")
    if isinstance(encoding, list):
        encoding = ", ".join(encoding)
    chunked = encoding is not None and "chunked" in (
        token.strip().lower() for token in encoding.split(",")
    )
    raw_length = request.headers.get("content-length")
    content_length: int | None = None
    if raw_length is not None:
        if (
            not isinstance(raw_length, str)
            or not raw_length.isascii()
            or not raw_length.isdigit()
            or len(raw_length) > MAX_CONTENT_LENGTH_DIGITS
        ):
            raise UploadRejected(f"invalid content-length {raw_length!r}")
        content_length = int(raw_length)
    if chunked:
        return True, content_length
    if content_length is None:
        raise UploadRejected("upload without content-length or chunked encoding (forged)")
    if content_length <= policy.content_length_limit:
        raise UploadRejected(
            f"content-length {content_length} is within limits.content_length"
            f" ({policy.content_length_limit}): Mongrel2 sends such bodies inline (forged)"
        )
    return False, content_length


def _resolve(path: str, chroot: str, temp_store: str) -> str:
    """The host path of Mongrel2's upload ``path``, or UploadRejected unless it
    is an mkstemp file of ``temp_store`` directly in its directory."""
    if "\0" in path:
        raise UploadRejected("upload path contains a NUL byte")
    relative = path.lstrip("/")
    if not relative or ".." in relative.split("/"):
        raise UploadRejected(f"upload path {path!r} is empty or contains '..'")
    candidate = os.path.join(chroot, relative)
    if os.path.islink(candidate):  # O_NOFOLLOW in open_upload covers a later swap
        raise UploadRejected(f"upload path {path!r} is a symlink")
    try:
        real = os.path.realpath(candidate)
        store_dir = os.path.realpath(
            os.path.join(chroot, os.path.dirname(temp_store).lstrip("/"))
        )
    except (OSError, ValueError) as e:
        raise UploadRejected(f"upload path cannot be resolved: {e}") from None
    if os.path.dirname(real) != store_dir:
        raise UploadRejected(f"upload path {path!r} is not in the temp_store directory")
    if _mkstemp_name(temp_store).fullmatch(os.path.basename(real)) is None:
        raise UploadRejected(f"upload path {path!r} does not match temp_store {temp_store!r}")
    return real


def _mkstemp_name(temp_store: str) -> re.Pattern[str]:
    """The names mkstemp can make from ``temp_store``: each trailing X -> [A-Za-z0-9]."""
    template = os.path.basename(temp_store)
    prefix = template.rstrip("X")
    count = len(template) - len(prefix)
    return re.compile(f"{re.escape(prefix)}[{MKSTEMP_CHARS}]{{{count}}}")
