"""An OpenAI-compatible HTTP server and a web chat page for one loaded model.

    minimind serve --model out/full_sft_768.pth          # or: python -m minimind_core.server
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "你好"}], "stream": true}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, upstream
MiniMind's POST /chat, and the chat page at /. ``app.py`` builds the FastAPI app; ``guard.py``
checks Host, Origin, Content-Type and body size before any route; what each endpoint does is in
``routes.py``; request checking and response bodies in ``schema.py``; generation runs in one
worker thread (``worker.py``); ``run.py`` runs it (uvicorn, a background thread, the command
line); the page is in ``web/``. FastAPI, Starlette and uvicorn are imported only inside this package.
"""

from .app import DEFAULT_SAMPLING, create_app
from .run import BackgroundServer, configure_parser, run, serve

__all__ = ["DEFAULT_SAMPLING", "BackgroundServer", "configure_parser", "create_app", "run", "serve"]
