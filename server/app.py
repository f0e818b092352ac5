"""The FastAPI app: the route table, the middleware stack and the model's lifespan.

Owns which URL goes to which handler and the order of the layers around them. Startup loads the
model on a background thread (so `/health` answers 503 until it is ready); shutdown runs after
uvicorn has let the in-flight responses finish, and stops the engine. Handlers live in the
`serving_*` modules; nothing here speaks the OpenAI protocol beyond the small GET routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

import megalodon_infer
from server.access_log import AccessLogMiddleware, BodySizeLimitMiddleware
from server.auth import APIKeyMiddleware
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.protocol import ModelCard, ModelList
from server.protocol_extensions import SessionResponse
from server.serving_chat import create_chat_completion
from server.serving_completions import create_completion
from server.serving_sessions import load_session, props, save_session
from server.serving_tokens import detokenize, tokenize, tokenizer_info
from server.settings import ServerSettings
from server.state import EngineFactory, ServerState, get_state, load_engine


def build_app(
    settings: ServerSettings,
    *,
    engine_factory: EngineFactory = load_engine,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The app serving `settings.model`.

    `engine_factory` builds the `LLMEngine` (on the loader thread); `on_fatal` is called there if
    loading fails, so the process can exit instead of answering 503 forever.
    """
    metrics = Metrics(settings.model_name, max_model_len=settings.max_model_len)
    state = ServerState(settings, metrics, engine_factory, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        await state.shutdown()

    app = FastAPI(title="megalodon-serve", version=megalodon_infer.__version__, lifespan=lifespan)
    app.state.megalodon = state
    install_error_handlers(app)

    route = app.add_api_route
    route("/health", health, methods=["GET"])
    route("/version", version, methods=["GET"])
    route("/metrics", metrics_endpoint, methods=["GET"])
    route("/v1/models", list_models, methods=["GET"], response_model=ModelList)
    route("/v1/completions", create_completion, methods=["POST"], response_model=None)
    route("/v1/chat/completions", create_chat_completion, methods=["POST"], response_model=None)
    route("/tokenize", tokenize, methods=["POST"])
    route("/detokenize", detokenize, methods=["POST"])
    route("/tokenizer_info", tokenizer_info, methods=["GET"])
    route("/props", props, methods=["GET"])
    route("/v1/sessions/save", save_session, methods=["POST"], response_model=SessionResponse)
    route("/v1/sessions/load", load_session, methods=["POST"], response_model=SessionResponse)

    # Added innermost first: a request meets the access log, then auth, then the size limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    api_keys = settings.api_keys()
    if api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=api_keys)
    app.add_middleware(AccessLogMiddleware, enabled=settings.access_log)
    return app


async def health(request: Request) -> Response:
    """200 once the model is loaded and the engine runs; 503 (with the reason) until then."""
    get_state(request).require_engine()
    return JSONResponse({"status": "ok"})


async def version() -> dict[str, str]:
    return {"version": megalodon_infer.__version__}


async def metrics_endpoint(request: Request) -> Response:
    metrics = get_state(request).metrics
    return Response(metrics.render(), media_type=metrics.content_type)


async def list_models(request: Request) -> ModelList:
    """The one served model; `root` (the model path) is what `vllm bench` loads a tokenizer from."""
    state = get_state(request)
    card = ModelCard(id=state.model_name, root=str(state.settings.model), max_model_len=state.max_model_len)
    return ModelList(data=[card])
