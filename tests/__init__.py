"""fleet's test suite; tests/support holds the helpers the tests, benches and fuzzers share."""
