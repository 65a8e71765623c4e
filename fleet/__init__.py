"""fleet: WSGI applications served as Mongrel2 handlers by a supervised worker fleet."""

__version__ = "0.1.0"
