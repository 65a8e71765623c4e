"""The per-host dispatcher: which thread gets which request, and the hop that carries it."""
