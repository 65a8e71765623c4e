"""ASGI 3 applications (``--interface asgi``): one event loop per worker process,
started by the supervisor as ``python -m fleet.asgi SPEC_JSON``."""
