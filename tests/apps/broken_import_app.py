"""A WSGI module that cannot be imported: its import fails (for the CLI error tests)."""

import fleet_test_module_that_does_not_exist  # noqa: F401


def application(environ, start_response):
    start_response("200 OK", [])
    return [b"unreachable"]
