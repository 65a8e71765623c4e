"""The per-host supervisor (gunicorn's arbiter) and the figures it keeps."""
