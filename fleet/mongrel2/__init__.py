"""The Mongrel2 handler protocol: the codec, uploads, and replies within Mongrel2's limits."""
