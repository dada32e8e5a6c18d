"""Which host: the fleet, discovery, health, statistics, the balancer and its policies, and each
request's plan and attempts. Synchronous where it decides, with no server, proxy or app: it
imports only edge.config, edge.errors, edge.dialects (the API names) and itself
(tests/test_layout.py), so a client library can route with it."""
