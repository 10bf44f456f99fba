"""Everything the tests and benchmarks share: images, the nydusd harness, real servers and rigs, fakes
(the layout is in docs/testing.md)."""
