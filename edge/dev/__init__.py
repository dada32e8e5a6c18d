"""The mock model server (every dialect, faults on demand): what the demo, the tests and the
load tests talk to."""
