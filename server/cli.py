"""`megalodon-serve`: flags (or `MEGALODON_*` environment variables) -> settings -> uvicorn.

Owns the command line and the process: logging, torch threads, the uvicorn server and signals.
SIGTERM stops accepting connections, lets in-flight requests finish (up to `--drain-timeout`
seconds), stops the engine and exits 0. A model that fails to load exits 1; bad flags exit 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

import uvicorn
from pydantic import ValidationError
from pydantic.fields import FieldInfo

import megalodon_infer
from server.app import build_app
from server.settings import ENV_PREFIX, ServerSettings

logger = logging.getLogger("megalodon.server")

EXIT_LOAD_FAILED = 1
EXIT_BAD_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """One flag per `ServerSettings` field, its environment variable named in the help."""
    parser = argparse.ArgumentParser(
        prog="megalodon-serve",
        description="OpenAI-compatible HTTP server for Megalodon language models. Every flag can also be "
        f"set through the environment variable shown with it ({ENV_PREFIX}*); flags win.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {megalodon_infer.__version__}")
    for name, field in ServerSettings.model_fields.items():
        _add_flag(parser, name, field)
    return parser


def _add_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    flag = "--" + name.replace("_", "-")
    env = ENV_PREFIX + name.upper()
    default = field.get_default(call_default_factory=True)
    help_text = f"{field.description} [env: {env}] (default: {default})"
    choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
    # Values stay strings here; pydantic converts and validates them together with the env vars.
    # SUPPRESS keeps flags that were not given out of the namespace, so the env var still applies.
    if field.annotation is bool:
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=help_text)
    else:
        parser.add_argument(flag, dest=name, metavar=name.upper() if choices is None else None, choices=choices,
                            default=argparse.SUPPRESS, help=help_text)


def parse_settings(argv: Sequence[str] | None = None) -> ServerSettings:
    """Settings from `argv` (default: the process's) over the environment; exits 2 when invalid."""
    parser = build_parser()
    flags: dict[str, Any] = vars(parser.parse_args(argv))
    try:
        return ServerSettings(**flags)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        parser.error(problems)
        raise  # parser.error exits; this keeps type checkers informed


def _check_model_dir(settings: ServerSettings) -> str | None:
    if (settings.model / "config.json").is_file():
        return None
    return (f"no model at {settings.model} (config.json missing); pass --model or set {ENV_PREFIX}MODEL "
            "to a checkpoint directory")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # NOTE: uvicorn handles SIGTERM itself while it serves (graceful shutdown) and then re-raises it
    # under the handler that was in place before; with this one the process ends with status 0
    # instead of being killed by the re-raised signal.
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or Ctrl-C; returns the process exit status."""
    settings = parse_settings(argv)
    _configure_logging(settings.log_level)
    problem = _check_model_dir(settings)
    if problem is not None:
        logger.error(problem)
        return EXIT_BAD_USAGE
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    server: uvicorn.Server | None = None

    def stop_after_load_failure() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(settings, on_fatal=stop_after_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging setup above; uvicorn's loggers propagate to it
        log_level=settings.log_level,
        access_log=False,  # AccessLogMiddleware writes richer lines (request id, tokens)
        timeout_graceful_shutdown=settings.drain_timeout,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    logger.info("serving %s from %s on http://%s:%d (%s, %s)", settings.model_name, settings.model,
                settings.host, settings.port, settings.dtype, settings.device)
    try:
        server.run()
    except KeyboardInterrupt:
        return 130
    if app.state.megalodon.load_error is not None:
        return EXIT_LOAD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
