"""An OpenAI-compatible HTTP server for a model with SelfExtend switched on (``selfextend serve``).

Endpoints: ``GET /health``, ``GET /v1/models`` (each model also reports its trained and extended
context length), ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming or not, with
``logprobs``). Errors use OpenAI's format ``{"error": {"message", "type", "param", "code"}}``.

    protocol.py  OpenAI's wire format: request models, the error type, response and chunk builders
    engine.py    jobs, the queue and the one worker thread that runs selfextend.generation's loop;
                 its steps -> text deltas with their logprobs
    app.py       the FastAPI routes, size limits and error handlers; ``serve`` runs the app with uvicorn

The command line is ``selfextend.commands.serve``.
"""

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as err:  # optional dependencies
    raise ImportError("`selfextend serve` needs fastapi and uvicorn: pip install 'selfextend[serve]'") from err

from .app import create_app, serve

__all__ = ["create_app", "serve"]
