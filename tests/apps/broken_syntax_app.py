"""A WSGI module with a syntax error (for the CLI error tests). Never import it in-process."""

def application(environ, start_response)   # the missing colon is the point
    start_response("200 OK", [])
    return [b"unreachable"]
