"""Helpers of `make bench` (loadtests/bench.py): the fast upstream, the stream client, configs."""
