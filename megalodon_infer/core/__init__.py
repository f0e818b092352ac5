"""Engine core: the scheduler (pure policy), the state-slot pool, the prefix cache and sessions.

Knows tokens, slots and state snapshots; nothing of text, sampling or HTTP.
"""
