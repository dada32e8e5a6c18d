"""`make chaos`: the edge under sustained load while its world breaks, as figures.

    .venv/bin/python -m loadtests.chaos [--duration 180] [--short] [--users 16] [--out FILE]

`edge serve --workers 2` (a subprocess, keys mode with the key store and limits in Redis) in
front of four `edge mock` hosts, reading them from a registry this process serves. Closed-loop
users (aiohttp, loopback only) send streamed and whole answers, OpenAI and Anthropic, for three
models, half of them keeping the affinity cookie. Under that load, one phase after another:
quiet; a host SIGKILLed and started again; a host SIGSTOPped and SIGCONTed; a host slow; a host
answering 500; streams cut mid-answer, between events and then in the middle of an event's
chunk (a host that died mid-write); the registry flapping (a host left out, 503, an empty
list); Redis SIGKILLed and started again empty; SIGHUP to the edge; quiet again. Then the load
stops, and a few long streams are in flight when the edge gets SIGTERM.

Figures (printed as a table, and as JSON in bench-results/chaos.json): per phase (a request
counts in the phase it started in), requests sent, answered OK, failed by cause, and the time to
the response head (p50/p99) with what it adds over the quiet phase; streams cut without an error
event and requests hung past their deadline (goal: 0 each); every request accounted for; the
workers' sockets (by peer), descriptors and RSS at the end against the start; the drain; the
edge log's tracebacks and ERROR lines. The exit status is 1 when a goal is missed (config and
logs are then kept). `--short` (about 40 s) is what tests/test_chaos.py runs.
"""
