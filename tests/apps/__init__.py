"""WSGI applications the tests serve (fleet finds them with --pythonpath tests/apps)."""
