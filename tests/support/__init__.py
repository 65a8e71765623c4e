"""What the tests, the benchmarks and the fuzzers share: real Mongrel2 and fleet processes,
namespace hosts, booted lab hosts, load generators and request encoders."""
