"""Micro-benchmark of the Mongrel2 codec's per-request calls (fleet.mongrel2.codec).

    .venv/bin/python -m bench.micro.mongrel2 [-n NUMBER] [-r REPEAT] [--profile]

Prints the best-of-REPEAT time per call in µs for parse_message on the
captured messages of tests/unit/test_mongrel2.py (tnetstring GET with 12
headers, tnetstring POST with a repeated header, JSON POST), peek_route and
encode_response for one conn id. ``--profile`` runs each case under cProfile
instead and prints the top entries.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bench.micro.cases import run_cases
from fleet.mongrel2.codec import encode_response, parse_message, peek_route

# Byte-identical to TNET_GET / TNET_POST / JSON_POST in tests/unit/test_mongrel2.py.
TNET_GET = (
    b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378 4 /t/hello 266:11:REMOTE_ADDR,9:127.0.0.1,"
    b"6:METHOD,3:GET,10:URL_SCHEME,4:http,7:PATTERN,3:/t/,5:QUERY,9:a=1&b=two,3:URI,"
    b"18:/t/hello?a=1&b=two,7:VERSION,8:HTTP/1.1,4:PATH,8:/t/hello,4:host,14:127.0.0.1:6780,"
    b"10:user-agent,11:curl/7.88.1,6:accept,3:*/*,15:x-forwarded-for,9:127.0.0.1,}0:,"
)
TNET_POST = (
    b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378 5 /t/form 363:11:REMOTE_ADDR,9:127.0.0.1,"
    b"6:METHOD,4:POST,10:URL_SCHEME,4:http,7:PATTERN,3:/t/,3:URI,7:/t/form,7:VERSION,"
    b"8:HTTP/1.1,4:PATH,7:/t/form,4:host,14:127.0.0.1:6780,10:user-agent,11:curl/7.88.1,"
    b'6:accept,3:*/*,3:x-q,19:he said "hi" \\ back,14:content-length,2:14,'
    b"12:content-type,33:application/x-www-form-urlencoded,15:x-forwarded-for,9:127.0.0.1,"
    b"5:x-dup,12:3:one,3:two,]}14:name=value&x=1,"
)
JSON_POST = (
    b"5a2b8d6e-0e8b-4c3e-9b1d-2f1f3c0a7e11 9 /j/form 355:"
    b'{"PATH":"/j/form","x-dup":["one","two"],"x-forwarded-for":"127.0.0.1",'
    b'"content-type":"application/x-www-form-urlencoded","content-length":"14",'
    b'"x-q":"he said \\"hi\\" \\\\ back","accept":"*/*","user-agent":"curl/7.88.1",'
    b'"host":"127.0.0.1:6780","METHOD":"POST","VERSION":"HTTP/1.1","URI":"/j/form",'
    b'"PATTERN":"/j/","URL_SCHEME":"http","REMOTE_ADDR":"127.0.0.1"},14:name=value&x=1,'
)
SENDER = b"34f9ceee-cd52-4b7f-b197-88bf2f0ec378"
IDS = [b"4"]
BODY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nHello world!"

CASES: dict[str, Callable[[], object]] = {
    "parse_message tnet GET": lambda: parse_message(TNET_GET),
    "parse_message tnet POST": lambda: parse_message(TNET_POST),
    "parse_message json POST": lambda: parse_message(JSON_POST),
    "peek_route": lambda: peek_route(TNET_GET),
    "encode_response (1 id)": lambda: encode_response(SENDER, IDS, BODY),
}


def main(argv: list[str] | None = None) -> int:
    return run_cases(CASES, __doc__.splitlines()[0], argv, number=100_000, repeat=7)

if __name__ == "__main__":
    sys.exit(main())
