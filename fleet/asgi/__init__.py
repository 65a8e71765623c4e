"""ASGI 3 applications (``--interface asgi``): one event loop per worker process."""
