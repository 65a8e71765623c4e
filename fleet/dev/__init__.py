"""Development tools shipped with fleet: a real Mongrel2 for demos, tests and benchmarks, and the demo."""
