"""HTTP layer of megalodon-serve: OpenAI-compatible wire types, errors, SSE framing and metrics.

Owns everything that speaks JSON or HTTP. The engine (`megalodon_infer`) never sees a pydantic model;
`server.convert` is the one place that turns a request into engine-side `SamplingParams`.
"""
