"""Logging: the local log, ``--logger zeromq:`` and the ``fleet logs`` collector."""
