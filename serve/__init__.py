"""`dalle serve`: a local web page for trying prompts on a trained model, over a documented JSON HTTP API
(docs/serving.md). FastAPI + uvicorn: app.py (the routes), request.py (a request's checks), jobs.py (the queue)."""

from serve.app import app_server, create_app, uvicorn_config

__all__ = ["app_server", "create_app", "uvicorn_config"]
