"""What happened, for people: Prometheus metrics (fed by each ended attempt and each answered
request's record), the samples shared by workers, and the access log."""
