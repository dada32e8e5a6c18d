"""The APIs clients speak to the edge: OpenAI's, Anthropic's and Google's (Gemini).

A request's dialect is decided from its path alone, before anything else is read, so that even a
request refused at the front door gets its error in the shape its SDK parses. The error shapes
themselves are in `edge.dialects.errors`; both sit below the HTTP server, the proxy and routing.
"""

from __future__ import annotations

from edge.dialects.paths import ANTHROPIC, GEMINI, OPENAI, dialect_of, is_gemini, split_workspace

__all__ = ["ANTHROPIC", "GEMINI", "OPENAI", "dialect_of", "is_gemini", "split_workspace"]
