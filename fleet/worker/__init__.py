"""A worker process: T threads running the application (``python -m fleet.worker``)."""
