"""The HTTP/1.1 wire, both directions, on httptools (llhttp): the front door's connections
(server), the upstream pool (client), chunked framing and upstream heads (chunked, heads).
It knows nothing of routing; its own error answers come from edge.dialects.errors."""
