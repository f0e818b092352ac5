"""The engine: the request object, `LLMEngine.step()`, `AsyncEngine` and the offline `LLM` API.

Owns a request's life from admission to its last output. Knows nothing of HTTP.
"""
