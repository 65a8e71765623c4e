"""Write the seed inputs of fuzz/corpus/<target>/seed-*: real messages to mutate.

    python -m fuzz.seed

Mongrel2 requests are the Mongrel2 1.12 captures of tests/unit/test_mongrel2.py,
uploads are genuine upload messages and the forgeries a handler must refuse, cluster datagrams are one of each kind.
Idempotent: rewrites the seed-* files and leaves the fuzzer's finds alone.
"""

from __future__ import annotations

from pathlib import Path

import msgpack

from fleet.cluster import protocol as cp
from fleet.config import Endpoint, HandlerConfig
from fuzz import targets
from tests.support.encoders import encode_json_request, encode_tnetstring_request

CORPUS = Path(__file__).resolve().parent / "corpus"

TNET_UUID = b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
JSON_UUID = b"5a2b8d6e-0e8b-4c3e-9b1d-2f1f3c0a7e11"
POST_HEADERS = {
    "REMOTE_ADDR": "127.0.0.1", "METHOD": "POST", "URL_SCHEME": "http", "PATTERN": "/t/",
    "URI": "/t/form", "VERSION": "HTTP/1.1", "PATH": "/t/form", "host": "127.0.0.1:6780",
    "user-agent": "curl/7.88.1", "accept": "*/*", "x-q": 'he said "hi" \\ back',
    "content-length": "14", "content-type": "application/x-www-form-urlencoded",
    "x-forwarded-for": "127.0.0.1", "x-dup": ["one", "two"],
}
UPLOAD_HEADERS = {
    "REMOTE_ADDR": "127.0.0.1", "METHOD": "POST", "VERSION": "HTTP/1.1", "PATH": "/t/up",
    "x-mongrel2-upload-start": "tmp/mongrel2.upload.LJoc1e", "host": "localhost",
    "content-length": "25000",
}

def _tnet(path: bytes, items: bytes, body: bytes = b"") -> bytes:
    """A tnetstring-protocol message around raw HEADERS items (which may be wrong)."""
    return TNET_UUID + b" 4 %s %d:%s}%d:%s," % (path, len(items), items, len(body), body)


U_ESCAPED = b'{"METHOD":"GET","x":"\\u00e9\\u0041"}'  # Mongrel2 never escapes so; fleet must cope

MONGREL2 = {
    "tnet-get": (
        TNET_UUID + b" 4 /t/hello 266:11:REMOTE_ADDR,9:127.0.0.1,"
        b"6:METHOD,3:GET,10:URL_SCHEME,4:http,7:PATTERN,3:/t/,5:QUERY,9:a=1&b=two,3:URI,"
        b"18:/t/hello?a=1&b=two,7:VERSION,8:HTTP/1.1,4:PATH,8:/t/hello,4:host,14:127.0.0.1:6780,"
        b"10:user-agent,11:curl/7.88.1,6:accept,3:*/*,15:x-forwarded-for,9:127.0.0.1,}0:,"
    ),
    "tnet-post": encode_tnetstring_request(TNET_UUID, b"5", b"/t/form", POST_HEADERS, b"name=value&x=1"),
    "json-post": encode_json_request(JSON_UUID, b"9", b"/j/form", POST_HEADERS, b"name=value&x=1"),
    "tnet-disconnect": TNET_UUID + b' 4 @* 16:6:METHOD,4:JSON,}21:{"type":"disconnect"},',
    "json-disconnect": JSON_UUID + b' 9 @* 17:{"METHOD":"JSON"},21:{"type":"disconnect"},',
    "tnet-credits": TNET_UUID
    + b' 2 @* 43:16:DOWNLOAD_CREDITS,4:1067,6:METHOD,4:JSON,}18:{"type":"credits"},',
    "tnet-credits-int": TNET_UUID
    + b' 2 @* 43:16:DOWNLOAD_CREDITS,4:1067#6:METHOD,4:JSON,}18:{"type":"credits"},',
    "json-credits": JSON_UUID
    + b' 2 @* 43:{"DOWNLOAD_CREDITS":"1067","METHOD":"JSON"},18:{"type":"credits"},',
    "other-control": TNET_UUID + b' 3 @* 16:6:METHOD,4:JSON,}16:{"type":"other"},',
    "client-at-t": TNET_UUID + b" 1 @t 70:4:PATH,2:@t,6:METHOD,4:JSON,7:PATTERN,2:@t,"
    b'11:REMOTE_ADDR,9:127.0.0.1,}21:{"type":"disconnect"},',
    "upload-start": encode_tnetstring_request(TNET_UUID, b"43", b"/t/up", UPLOAD_HEADERS, b""),
    "upload-done-json": encode_json_request(
        JSON_UUID, b"43", b"/t/up", {**UPLOAD_HEADERS, "x-mongrel2-upload-done": "tmp/mongrel2.upload.LJoc1e"}, b""),
    "json-raw-control-latin1": JSON_UUID
    + b' 7 /j/x 37:{"METHOD":"GET","x-t":"a\tb\xe9","\xff":"\x00"},0:,',
    "json-u-escape": JSON_UUID + b' 7 /j/x %d:%s,0:,' % (len(U_ESCAPED), U_ESCAPED),
    "websocket": TNET_UUID
    + b" 8 /ws 49:6:METHOD,9:WEBSOCKET,5:FLAGS,4:0x81,4:PATH,3:/ws,}8:hello ws,",
    "tnet-http10": encode_tnetstring_request(
        TNET_UUID, b"2147483647", b"/t/k",
        {"METHOD": "GET", "VERSION": "HTTP/1.0", "connection": "keep-alive", "n": "1"}, b""),
    # Refusals, one per framing step, so the fuzzer starts on both sides of each check.
    "bad-trailing-garbage": _tnet(b"/t", b"6:METHOD,3:GET,") + b"x",
    "bad-body-length-lies": _tnet(b"/t", b"6:METHOD,3:GET,")[:-3] + b"5:abc,",
    "bad-conn-id": _tnet(b"/t", b"6:METHOD,3:GET,").replace(b" 4 ", b" 04 ", 1),
    "bad-tnetstring": _tnet(b"/t", b"6:METHOD,3:GET;"),
    "bad-json": JSON_UUID + b' 4 /t 15:{"METHOD":"GET",0:,',
    "bad-no-method": _tnet(b"/t", b"13:UPLOAD_STREAM,1:1,"),
    "bad-credits": _tnet(b"@*", b"16:DOWNLOAD_CREDITS,1:x,6:METHOD,4:JSON,", b'{"type":"credits"}'),
}


def _upload(policy: int, headers: str, body: bytes = b"") -> bytes:
    return bytes([policy]) + headers.encode("latin-1") + b"\n" + body


GENUINE = "tmp/mongrel2.upload.LJoc1e"
START = f"x-mongrel2-upload-start: {GENUINE}\n"
BOTH = START + f"x-mongrel2-upload-done: {GENUINE}\n"
UPLOADS = {
    "ordinary": _upload(1, "host: localhost\ncontent-length: 3\n", b"abc"),
    "disabled": _upload(0, BOTH + "content-length: 25000\n"),
    "start": _upload(1, START + "content-length: 25000\n"),
    "done": _upload(1, BOTH + "content-length: 25000\n"),
    "done-absolute": _upload(1, "x-mongrel2-upload-start: /tmp/mongrel2.upload.LJoc1e\n"
                                "x-mongrel2-upload-done: /tmp/mongrel2.upload.LJoc1e\ncontent-length: 25000\n"),
    "done-chunked": _upload(1, "x-mongrel2-upload-start: tmp/mongrel2.upload.empty0\n"
                               "x-mongrel2-upload-done: tmp/mongrel2.upload.empty0\n"
                               "transfer-encoding: gzip, chunked\n"),
    "done-wrong-size": _upload(1, BOTH + "content-length: 25001\n"),
    "done-inline-size": _upload(1, BOTH + "content-length: 20480\n"),
    "etc-passwd": _upload(1, "x-mongrel2-upload-start: /etc/passwd\n"
                             "x-mongrel2-upload-done: /etc/passwd\ncontent-length: 3\n", b"abc"),
    "mismatch": _upload(1, START + "x-mongrel2-upload-done: tmp/mongrel2.upload.linkA1\n"
                                   "content-length: 25000\n"),
    "repeated": _upload(1, BOTH + START + "content-length: 25000\n"),
    "custom-store": _upload(2, "x-mongrel2-upload-start: var/up/upload.AbCdEfGh\n"
                               "x-mongrel2-upload-done: var/up/upload.AbCdEfGh\ncontent-length: 30000\n"),
    "rooted-store": _upload(3, "x-mongrel2-upload-start: mongrel2.upload.Rooted\n"
                               "x-mongrel2-upload-done: mongrel2.upload.Rooted\ncontent-length: 25000\n"),
    "symlinked-chroot": _upload(4, BOTH + "content-length: 25000\n"),
}
for trap in ["tmp/../tmp/mongrel2.upload.LJoc1e", "tmpl/mongrel2.upload.LJoc1e",
             "escape/mongrel2.upload.Secret", "tmp/mongrel2.upload.linkA1",
             "tmp/mongrel2.upload.linkB2", "tmp/mongrel2.upload.devnul",
             "tmp/mongrel2.upload.fifo00", "tmp/mongrel2.upload.dir000",
             "tmp/mongrel2.upload.seven77", "tmp/sub/mongrel2.upload.Nested",
             "tmp/notes.txt", "tmp/mongrel2.upload.LJoc1e\x00", "tmp//mongrel2.upload.LJoc1e/"]:
    name = trap.replace("/", "_").replace("\x00", "NUL").strip("_")
    UPLOADS[f"trap-{name}"] = _upload(
        1, f"x-mongrel2-upload-start: {trap}\nx-mongrel2-upload-done: {trap}\ncontent-length: 25000\n")

ENVELOPE = dict(cluster=targets.CLUSTER, node_id=bytes(range(16)), boot_id=b"\xb0" * 16, seq=1,
                timestamp=targets.NOW)
CONFIG = HandlerConfig(
    endpoints=(Endpoint("tcp://10.0.0.1:9999", "tcp://10.0.0.1:9998"),),
    app="app:application", processes=4, threads=8, extra={"nested": {"a": [1, 2.5, None, b"x"]}},
).to_dict()
MEMBER = ["a" * 32, "web-1", ["10.0.0.7", 7000], "node", "ready", 3, 7, 8, 1.5]
MESSAGES = {
    "announce": cp.Announce(**ENVELOPE, generation=3, config=CONFIG, address=("10.0.0.1", 7000),
                            members=[MEMBER]),
    "config-request": cp.ConfigRequest(**ENVELOPE),
    "heartbeat": cp.Heartbeat(**ENVELOPE, role="node", state="ready", generation=3,
                              workers_ready=7, workers_total=8, requests_served=12345,
                              requests_per_second=41.5, rss=200 * 2**20, hostname="web-1",
                              address=("10.0.0.7", 7000), app_version="1.4.2",
                              error="ImportError: no module app"),
    "reload": cp.Reload(**ENVELOPE, command_id=bytes(16), generation=4, batch=2),
    "log": cp.Log(**ENVELOPE, level="warning", text="disk is 91% full\ton /srv"),
    "leave": cp.Leave(**ENVELOPE),
    "status-request": cp.StatusRequest(**ENVELOPE),
    "announce-page": cp.Announce(**ENVELOPE, generation=3, config=CONFIG, address=("10.0.0.1", 7000),
                                 members=[MEMBER], page=2, pages=3),
}


def seeds() -> dict[str, dict[str, bytes]]:
    cluster_datagram: dict[str, bytes] = {}
    cluster_signed: dict[str, bytes] = {}
    for name, message in MESSAGES.items():
        signed = cp.encode(message, targets.KEYRING)
        cluster_datagram[f"{name}-signed"] = signed
        cluster_datagram[f"{name}-unsigned"] = cp.encode(message, targets.UNSIGNED)
        cluster_signed[name] = bytes([message.KIND]) + signed[cp.HEADER_LEN:]
    # Hand-made payloads: float32 timestamp, an unknown body key, a missing one.
    cluster_signed["leave-float32-extra-key"] = bytes([cp.Kind.LEAVE]) + msgpack.packb(
        [targets.CLUSTER, bytes(16), bytes(16), 5, 1_700_000_000, {"new": [1, {"x": None}]}],
        use_bin_type=True, use_single_float=True)
    cluster_signed["reload-missing-field"] = bytes([cp.Kind.RELOAD]) + msgpack.packb(
        [targets.CLUSTER, bytes(16), bytes(16), 5, targets.NOW, {"generation": 2}],
        use_bin_type=True)
    return {"mongrel2": MONGREL2, "uploads": UPLOADS, "cluster_datagram": cluster_datagram,
            "cluster_signed": cluster_signed}


def main() -> None:
    for target, inputs in seeds().items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in inputs.items():
            (directory / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(inputs)} seeds in {directory}")


if __name__ == "__main__":
    main()
