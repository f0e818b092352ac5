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
from starlette.responses import JSONResponse, PlainTextResponse, Response

import megalodon_infer
from server import openapi
from server.access_log import AccessLogMiddleware, BodySizeLimitMiddleware
from server.auth import APIKeyMiddleware
from server.errors import install_error_handlers
from server.lifecycle import DrainMiddleware
from server.metrics import MAX_TOKENS_BUCKET, Metrics
from server.openapi import PLAIN_TEXT, errors, json_or_stream
from server.protocol import ChatCompletionResponse, CompletionResponse, ModelCard, ModelList
from server.protocol_extensions import SessionResponse
from server.protocol_responses import ResponseDeleted, ResponseObject
from server.responses_store import ResponseStore
from server.serving_chat import create_chat_completion
from server.serving_completions import create_completion
from server.serving_responses import create_response, delete_response, retrieve_response
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
    metrics = Metrics(settings.model_name, max_model_len=settings.max_model_len or MAX_TOKENS_BUCKET)
    state = ServerState(settings, metrics, engine_factory, on_fatal)
    responses = ResponseStore(settings.max_stored_responses, settings.max_stored_response_bytes,
                              settings.session_dir / "responses" if settings.session_dir is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        await responses.drain()  # stored responses still being written
        await state.shutdown()

    app = FastAPI(title="megalodon-serve", version=megalodon_infer.__version__, lifespan=lifespan)
    app.state.megalodon = state
    app.state.responses = responses
    install_error_handlers(app)

    route = app.add_api_route
    generation = {"response_model": None, "responses": {**json_or_stream(CompletionResponse),
                                                        **errors(400, 404, 429, 503)}}
    route("/health", health, methods=["GET"], responses=errors(503))
    route("/version", version, methods=["GET"])
    route("/metrics", metrics_endpoint, methods=["GET"], response_class=PlainTextResponse, responses=PLAIN_TEXT)
    route("/v1/models", list_models, methods=["GET"], response_model=ModelList, responses=errors(503))
    route("/v1/completions", create_completion, methods=["POST"], **generation)
    route("/v1/chat/completions", create_chat_completion, methods=["POST"], response_model=None,
          responses={**json_or_stream(ChatCompletionResponse), **errors(400, 404, 429, 503)})
    route("/v1/responses", create_response, methods=["POST"], response_model=None,
          responses={**json_or_stream(ResponseObject), **errors(400, 404, 429, 503)})
    route("/v1/responses/{response_id}", retrieve_response, methods=["GET"], response_model=None,
          responses={200: {"model": ResponseObject, "description": "The stored response"}, **errors(404, 503)})
    route("/v1/responses/{response_id}", delete_response, methods=["DELETE"], response_model=ResponseDeleted,
          responses=errors(404, 503))
    route("/tokenize", tokenize, methods=["POST"], responses=errors(400, 404, 503))
    route("/detokenize", detokenize, methods=["POST"], responses=errors(400, 404, 503))
    route("/tokenizer_info", tokenizer_info, methods=["GET"], responses=errors(400, 503))
    route("/props", props, methods=["GET"], responses=errors(503))
    for path, handler in (("/v1/sessions/save", save_session), ("/v1/sessions/load", load_session)):
        route(path, handler, methods=["POST"], response_model=SessionResponse, responses=errors(400, 404, 503))
    openapi.install(app)

    # Added innermost first: a request meets the access log, the drain, auth, then the body limits.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout)
    api_keys = settings.api_keys()
    if api_keys or settings.admin_api_key:
        app.add_middleware(APIKeyMiddleware, api_keys=api_keys, admin_key=settings.admin_api_key)
    app.add_middleware(DrainMiddleware, state=state)
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
