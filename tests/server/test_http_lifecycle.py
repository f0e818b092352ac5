"""The process lifecycle of `megalodon-serve`: graceful shutdown on SIGTERM and exit statuses.

Each test starts its own server process (the session server must outlive them).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, parse_settings
from server.settings import ServerSettings
from tests.harness import ServerProcess, wait_until

STREAM_TOKENS = 600


def read_stream(base_url: str, prompt: str, first_chunk: threading.Event, result: dict) -> None:
    body = {"prompt": prompt, "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as response:
        result["status"] = response.status_code
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                first_chunk.set()
    result["events"] = events


@pytest.mark.slow
def test_sigterm_finishes_streams_in_flight_then_exits_0(model_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(model_dir, tmp_path / "server.log", ["--drain-timeout", "120"])
    try:
        server.wait_healthy()
        results = [{}, {}]
        started = [threading.Event(), threading.Event()]
        readers = [threading.Thread(target=read_stream, args=(server.base_url, prompt, started[i], results[i]))
                   for i, prompt in enumerate(["def a():", "class B:"])]
        for reader in readers:
            reader.start()
        assert all(event.wait(timeout=60) for event in started)

        server.process.send_signal(15)  # SIGTERM
        # the server drains: it keeps listening, answers new requests 503, and lets the open ones finish
        assert wait_until(lambda: "draining" in server.log_text(), timeout_s=30)
        late = httpx.post(server.base_url + "/v1/completions", json={"prompt": "late", "max_tokens": 1})
        assert late.status_code == 503 and "Retry-After" in late.headers
        assert late.json()["error"]["type"] == "ServiceUnavailableError"
        for reader in readers:
            reader.join(timeout=120)
        assert server.process.wait(timeout=60) == 0
    finally:
        server.terminate()
    for result in results:
        assert result["status"] == 200
        events = result["events"]
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == STREAM_TOKENS
        assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    log = server.log_text()
    assert "engine stopped" in log
    assert log.count(f"completion_tokens={STREAM_TOKENS}") == 2  # both streams logged as complete
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_model_that_fails_to_load_exits_1(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["model"]["num_layers"] = 0
    (broken / "config.json").write_text(json.dumps(config))
    server = ServerProcess(broken, tmp_path / "server.log")
    try:
        assert server.process.wait(timeout=120) == 1
    finally:
        server.terminate()
    log = server.log_text()
    assert "num_layers must be positive" in log
    # one line, before anything claims to be running
    assert "Traceback" not in log and "Uvicorn running" not in log and "Started server" not in log


def test_flags_win_over_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEGALODON_PORT", "9001")
    monkeypatch.setenv("MEGALODON_MAX_NUM_SEQS", "3")
    monkeypatch.setenv("MEGALODON_ACCESS_LOG", "false")
    keys = tmp_path / "keys"
    keys.write_text("key-a\nkey-b, key-c\n")
    monkeypatch.setenv("MEGALODON_API_KEY_FILE", str(keys))
    settings = parse_settings(["--port", "9002", "--model", str(tmp_path), "--api-key", "key-z"])
    assert settings.port == 9002
    assert settings.max_num_seqs == 3
    assert settings.access_log is False
    assert settings.model_name == tmp_path.name
    assert settings.api_keys() == ["key-z", "key-a", "key-b", "key-c"]
    assert parse_settings(["--access-log"]).access_log is True
    assert parse_settings([]).model_name == "megalodon-demo"


@pytest.mark.parametrize("argv", [["--max-num-seqs", "0"], ["--port", "http"], ["--dtype", "int8"],
                                  ["--max-num-seqs", "64", "--max-num-batched-tokens", "32"], ["--no-such-flag"]])
def test_invalid_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_names_every_flag_and_its_environment_variable() -> None:
    help_text = " ".join(build_parser().format_help().split())
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert "MEGALODON_" + name.upper() in help_text
