"""WSGI: the environ, HTTP/1.x response framing, and one request through the application."""
