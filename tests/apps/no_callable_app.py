"""A WSGI module that imports fine but has no `application` (for the CLI error tests)."""

NOT_AN_APP = 42
