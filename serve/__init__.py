"""`dalle serve`: a local web page for trying prompts on a trained model, over a documented JSON HTTP API
(docs/serving.md). FastAPI + uvicorn: app.py (the routes), request.py (a request's checks), jobs.py (the queue)."""

from serve.app import create_app, uvicorn_config

__all__ = ["create_app", "uvicorn_config"]
