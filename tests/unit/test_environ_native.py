"""The compiled build_environ (fleet/wsgi/_environ.c) against its reference
(fleet.wsgi.environ.build_environ): the same environ, keys in the same order,
or the same error. tests/unit/test_environ.py also builds every environ of
its cases with both."""

from __future__ import annotations

import io
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import native
from fleet.mongrel2.codec import Request
from fleet.wsgi import environ as reference

pytestmark = pytest.mark.skipif(native.PURE, reason="FLEET_PURE is set: the compiled environ is not used")
COMPILED_BUILD = native.twin("fleet.wsgi._environ", "build_environ", None)


def outcome(build, request: Request, body, **kw) -> tuple:
    try:
        environ = build(request, body=body, errors=sys.stderr, multithread=True, multiprocess=False, **kw)
    except Exception as error:
        return ("error", type(error), str(error))
    return ("environ", list(environ.items()))


def same(request: Request, **kw) -> None:
    body = io.BytesIO(request.body)
    assert outcome(COMPILED_BUILD, request, body, **kw) == outcome(reference.build_environ, request, body, **kw)


def test_the_compiled_twin_is_the_one_that_runs() -> None:
    assert COMPILED_BUILD is not None, "fleet.wsgi._environ was not built (pip install -e . builds it)"


text = st.text(st.characters(max_codepoint=255), max_size=10)
values = st.one_of(text, st.lists(text, max_size=3), st.just(""), st.sampled_from(["5", " 5", "-1", "x"]))
mongrel2_keys = st.sampled_from(["METHOD", "URL_SCHEME", "PATH", "QUERY", "URI", "VERSION", "REMOTE_ADDR",
                                 "PATTERN", "host"])
client_keys = st.sampled_from(["content-length", "content-type", "cookie", "accept", "x-a_b", "X-Up",
                               "x-mongrel2-upload-done", "host"]) | text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(mongrel2_keys | client_keys, values, max_size=10),
    method=st.sampled_from(["GET", "POST", "", None, ["GET", "PUT"]]),
    path=st.sampled_from([b"/", b"/a%20b", b"/caf\xe9", b"/app/x"]),
    content_length=st.sampled_from([None, 0, 12]),
    script_name=st.sampled_from([None, "", "/", "/app", "/app/", "app"]),
)
def test_generated_requests_build_the_same_environ(headers, method, path, content_length, script_name) -> None:
    if method is not None:
        headers["METHOD"] = method
    request = Request(sender=b"s", conn_id=b"9", path=path, headers=headers, body=b"")
    kw = {"content_length": content_length}
    if script_name is not None:
        kw["script_name"] = script_name
    same(request, **kw)


def test_odd_arguments_go_to_the_reference() -> None:
    request = Request(sender=b"s", conn_id=b"9", path=b"/", headers={"METHOD": "GET"}, body=b"")
    body = io.BytesIO()
    with pytest.raises(TypeError):
        COMPILED_BUILD(request, body=body)
    with pytest.raises(TypeError):
        COMPILED_BUILD(request, body, None, sys.stderr, False, False)
    odd = Request(sender=b"s", conn_id=b"9", path=b"/", headers={"METHOD": "GET", 3: "x"}, body=b"")
    same(odd, content_length=None)
