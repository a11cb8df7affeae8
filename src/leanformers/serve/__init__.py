"""Serving: an OpenAI-compatible HTTP server with continuous batching (`leanformers serve`).

    from leanformers.serve.engine import Engine           # torch only
    from leanformers.serve.app import create_app, run     # needs the `serve` extra: fastapi, uvicorn, pydantic

- engine.py: one loop owns the model; requests join and leave the running batch at step boundaries,
  over a static KV cache of one row per sequence slot.
- sequence.py: one choice in flight: sampling with its own parameters and seed, penalties, logprobs, text.
- app.py / schemas.py: the OpenAI API's routes and bodies, errors, streaming (server-sent events).
- metrics.py: Prometheus metrics. embeddings.py: the /v1/embeddings hook.

Importing this package imports nothing beyond leanformers itself: the HTTP parts load with app.py.
"""
