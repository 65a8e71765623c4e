"""One WebSocket's ASGI side, with no I/O: the app's messages and the client's in,
the client's bytes and the app's events out.

The same session serves a WebSocket that came through Mongrel2 and one on
--http. Only the edges differ, and the transports handle them:
- Mongrel2 (1.12) hands the handler the handshake as a request with METHOD
  WEBSOCKET_HANDSHAKE whose body is the Sec-WebSocket-Accept value it
  computed, and each client message, reassembled and unmasked, as a request
  with METHOD WEBSOCKET and FLAGS the frame's first byte ("0x81"). It sends
  nothing itself: the 101, pongs and close echoes are the handler's, written
  as raw bytes in ordinary replies; an empty reply closes the connection.
- --http parses the client's frames with wsproto.

What leaves is always bytes for the client (unmasked server frames, or the
HTTP answer to the handshake) and END, after which the connection closes.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from http import HTTPStatus
from typing import Any

from fleet.asgi.cycle import AsgiProtocolError
from fleet.asgi.scope import connection_scope
from fleet.config import DEFAULT_WEBSOCKET_MAX_SIZE
from fleet.mongrel2.codec import Request

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
END = b""  # in an output list: close the connection after what comes before

# RFC 6455 7.4.1 close codes used here.
NORMAL, GOING_AWAY, PROTOCOL_ERROR, NO_STATUS, ABNORMAL, INVALID_DATA, TOO_BIG, INTERNAL_ERROR = (
    1000, 1001, 1002, 1005, 1006, 1007, 1009, 1011)
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SCHEMES = {"http": "ws", "https": "wss"}

CONNECTING, OPEN, CLOSING, CLOSED = "connecting", "open", "closing", "closed"


def accept_token(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip().encode("latin-1") + _GUID).digest()).decode()


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One whole, unmasked server frame."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


def close_frame(code: int, reason: str = "") -> bytes:
    if code == NO_STATUS:
        return encode_frame(CLOSE, b"")
    return encode_frame(CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123])


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a close frame's payload; 1005 when it has none."""
    if len(payload) < 2:
        return NO_STATUS, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


def websocket_scope(request: Request, *, root_path: str = "", state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``websocket`` scope of a handshake (from Mongrel2 or --http: the same keys)."""
    scope = connection_scope(request, "websocket", root_path=root_path, state=state, schemes=_SCHEMES)
    protocols = request.header("sec-websocket-protocol") or ""
    scope["subprotocols"] = [p.strip() for p in protocols.split(",") if p.strip()]
    return scope


class WebSocketSession:
    """The state of one WebSocket between the app and its client."""

    def __init__(self, accept: str, max_size: int = DEFAULT_WEBSOCKET_MAX_SIZE) -> None:
        """``accept``: the handshake's Sec-WebSocket-Accept value."""
        self.accept = accept
        self.max_size = max_size
        self.state = CONNECTING
        self.close_code: int | None = None  # how it ended, once it has
        self.status: str | None = None  # what the handshake was answered, for the tally

    # -- the app's side ------------------------------------------------------------

    def app_sends(self, message: dict[str, Any]) -> list[bytes]:
        """Bytes for the client (and maybe END) for one message the app sent."""
        kind = message.get("type") if isinstance(message, dict) else None
        if self.state == CONNECTING:
            if kind == "websocket.accept":
                response = self._accepted(message)  # checked before anything changes
                self.state = OPEN
                self.status = "101 Switching Protocols"
                return [response]
            if kind == "websocket.close":
                self.state = CLOSED
                self.status = "403 Forbidden"
                self.close_code = int(message.get("code", NORMAL))
                return [_refusal(403), END]
            raise AsgiProtocolError(f"expected websocket.accept or websocket.close, got {kind!r}")
        if self.state != OPEN:
            raise AsgiProtocolError(f"{kind!r} sent after the WebSocket was closed")
        if kind == "websocket.send":
            text, data = message.get("text"), message.get("bytes")
            if isinstance(text, str) and data is None:
                return [encode_frame(TEXT, text.encode("utf-8"))]
            if isinstance(data, (bytes, bytearray)) and text is None:
                return [encode_frame(BINARY, bytes(data))]
            raise AsgiProtocolError("websocket.send needs exactly one of 'text' (str) and 'bytes' (bytes)")
        if kind == "websocket.close":
            self.state = CLOSING  # the client's echo, or a timeout, ends it
            self.close_code = int(message.get("code", NORMAL))
            return [close_frame(self.close_code, message.get("reason") or "")]
        raise AsgiProtocolError(f"expected websocket.send or websocket.close, got {kind!r}")

    def app_returned(self) -> list[bytes]:
        """The app is done: refuse a handshake it never answered; close an open socket."""
        if self.state == CONNECTING:
            self.state = CLOSED
            self.status = "403 Forbidden"
            return [_refusal(403), END]
        if self.state == OPEN:
            self.state = CLOSING
            self.close_code = NORMAL
            return [close_frame(NORMAL)]
        return []

    def app_failed(self) -> list[bytes]:
        """The app raised: 500 for a handshake not answered yet, close 1011 for an open socket."""
        if self.state == CONNECTING:
            self.state = CLOSED
            self.status = "500 Internal Server Error"
            return [_refusal(500), END]
        if self.state == OPEN:
            self.state = CLOSED
            self.close_code = INTERNAL_ERROR
            return [close_frame(INTERNAL_ERROR), END]
        return []

    def going_away(self) -> list[bytes]:
        """The worker must end (its graceful timeout is near): close with 1001."""
        if self.state == OPEN:
            self.state = CLOSING
            self.close_code = GOING_AWAY
            return [close_frame(GOING_AWAY)]
        if self.state == CONNECTING:
            self.state = CLOSED
            self.status = "503 Service Unavailable"
            return [_refusal(503), END]
        return []

    def close_timed_out(self) -> tuple[list[dict[str, Any]], list[bytes]]:
        """The client never echoed our close frame: the connection ends, and so does the app's wait."""
        if self.state == CLOSING:
            self.state = CLOSED
            return [self._disconnect(self.close_code or ABNORMAL)], [END]
        return [], []

    # -- the client's side -------------------------------------------------------------

    def client_sends(self, opcode: int, payload: bytes | str) -> tuple[list[dict[str, Any]], list[bytes]]:
        """(events for the app's receive(), bytes for the client) for one whole client message."""
        if self.state == CLOSED:
            return [], []
        if opcode == CLOSE:
            code, reason = payload if isinstance(payload, tuple) else parse_close(payload)
            if self.state == CLOSING:  # the echo of ours
                self.state = CLOSED
                return [self._disconnect(self.close_code or code)], [END]
            self.state = CLOSED
            self.close_code = code
            if code != NO_STATUS and not _valid_close_code(code):
                return [self._disconnect(code, reason)], [close_frame(PROTOCOL_ERROR), END]
            echo = close_frame(NORMAL if code == NO_STATUS else code)
            return [self._disconnect(code, reason)], [echo, END]
        if opcode == PING:
            return [], [encode_frame(PONG, payload if isinstance(payload, bytes) else payload.encode())]
        if opcode == PONG:
            return [], []
        if opcode not in (TEXT, BINARY):
            return self.fail(PROTOCOL_ERROR, f"opcode {opcode:#x}")
        if len(payload) > self.max_size:
            return self.fail(TOO_BIG, "")
        if self.state != OPEN and self.state != CONNECTING:
            return [], []  # closing: data after our close frame is dropped (RFC 6455 5.5.1)
        if opcode == TEXT:
            if isinstance(payload, bytes):
                try:
                    payload = payload.decode("utf-8")
                except UnicodeDecodeError:
                    return self.fail(INVALID_DATA, "text is not UTF-8")
            return [{"type": "websocket.receive", "text": payload}], []
        return [{"type": "websocket.receive", "bytes": bytes(payload)}], []

    def client_gone(self) -> list[dict[str, Any]]:
        """The connection ended without a close handshake."""
        if self.state == CLOSED:
            return []
        self.state = CLOSED
        self.close_code = self.close_code or ABNORMAL
        return [self._disconnect(ABNORMAL)]

    # -- internals -------------------------------------------------------------------------

    def _accepted(self, message: dict[str, Any]) -> bytes:
        lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
                 b"Sec-WebSocket-Accept: " + self.accept.encode("latin-1")]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            lines.append(b"Sec-WebSocket-Protocol: " + str(subprotocol).encode("latin-1"))
        for name, value in message.get("headers") or ():
            if not isinstance(name, bytes) or not isinstance(value, bytes) or b"\r" in name + value \
                    or b"\n" in name + value:
                raise AsgiProtocolError("websocket.accept: headers must be (bytes, bytes) with no CR or LF")
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def fail(self, code: int, why: str) -> tuple[list[dict[str, Any]], list[bytes]]:
        """The client broke the protocol or a limit: close with ``code``."""
        if self.state == CLOSED:
            return [], []
        self.state = CLOSED
        self.close_code = code
        return [self._disconnect(code, why)], [close_frame(code, why), END]

    @staticmethod
    def _disconnect(code: int, reason: str = "") -> dict[str, Any]:
        return {"type": "websocket.disconnect", "code": code, "reason": reason}


def _valid_close_code(code: int) -> bool:
    """A code a close frame may carry (RFC 6455 7.4.1-7.4.2): 1005, 1006 and 1015 never travel."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or 3000 <= code <= 4999


def _refusal(status: int) -> bytes:
    phrase = HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode()
