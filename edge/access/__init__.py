"""Who may ask, and how much: API keys and their stores, rate limits (local or Redis), and the
usage metered per key. Called by the proxy; passthrough mode builds none of it."""
