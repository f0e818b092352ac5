"""megalodon-serve on Ray Serve: session-affine replicas of the same FastAPI app, one engine each.

The layer above `server`: it imports the app and its settings, never the other way round, and is
the only code that imports Ray (an optional extra: `pip install 'megalodon-infer[ray]'`).
"""
