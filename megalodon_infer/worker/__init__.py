"""The worker: turns a step's work into model calls over the slot pool (eager or CUDA graphs).

Owns the choice of decode kernels and their derived weights. Knows nothing of requests.
"""
