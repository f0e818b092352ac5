"""Sampling: per-request settings, logits processing, token choice and logprobs.

Knows nothing of the scheduler, slots, HTTP or text.
"""
