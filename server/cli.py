"""`megalodon-serve`: flags (or `MEGALODON_*` environment variables) -> settings -> uvicorn.

Owns the command line and the process: logging, the checks made before anything starts, the uvicorn
server and the exit status. Bad flags exit 2. A missing or bad checkpoint, or a port in use, is one
line on stderr and exit 1, before the server claims to be running (and before any thread starts).
SIGTERM drains (`server.lifecycle`), stops the engine and exits 0. A model whose weights fail to
load later (on the loader thread) exits 1 with one line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

import megalodon_infer
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
    # argparse %-formats help strings
    help_text = f"{field.description} [env: {env}] (default: {default})".replace("%", "%%")
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


def _preflight(settings: ServerSettings) -> str | None:
    """Why the server cannot start (checked without reading the weights), or None."""
    if not (settings.model / "config.json").is_file():
        return (f"no model at {settings.model} (config.json missing); pass --model or set {ENV_PREFIX}MODEL "
                "to a checkpoint directory")
    from megalodon_infer.model.loading import CheckpointError, inspect_checkpoint
    from megalodon_infer.tokenization.tokenizer import Tokenizer

    try:
        inspect_checkpoint(settings.model)
        Tokenizer.from_dir(settings.model)
    except (CheckpointError, ValueError, OSError) as exc:
        return f"cannot serve {settings.model}: {exc}"
    return None


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
    problem = _preflight(settings)
    if problem is not None:
        print(f"megalodon-serve: {problem}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    # NOTE: imported only now, so `--help` and bad flags answer without loading torch and uvicorn.
    import uvicorn

    from server.app import build_app
    from server.lifecycle import DrainingServer, PortInUseError, bind_socket, deadline_protocol

    try:
        sock = bind_socket(settings.host, settings.port)
    except PortInUseError as exc:
        print(f"megalodon-serve: cannot listen: {exc}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server: DrainingServer | None = None

    def stop_after_load_failure() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(settings, on_fatal=stop_after_load_failure)
    config = uvicorn.Config(
        app,
        log_config=None,  # our logging setup above; uvicorn's loggers propagate to it
        log_level=settings.log_level,
        access_log=False,  # AccessLogMiddleware writes richer lines (request id, tokens)
        timeout_graceful_shutdown=5,  # the drain has already let requests finish (server.lifecycle)
        http=deadline_protocol(settings.header_timeout),
        lifespan="on",
    )
    server = DrainingServer(config, app.state.megalodon, settings.drain_timeout)
    logger.info("serving %s from %s on http://%s:%d (%s, %s)", settings.model_name, settings.model,
                settings.host, settings.port, settings.dtype, settings.device)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return 130
    load_error = app.state.megalodon.load_error
    if load_error is not None:
        print(f"megalodon-serve: the model failed to load: {load_error}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
