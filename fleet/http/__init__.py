"""``--http``: plain HTTP/1.1 beside Mongrel2, parsed sans-I/O and served by the same threads."""
