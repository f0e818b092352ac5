"""Tenants and bad values: sessions and cached prefixes stay with the key that made them, blank keys
never turn authentication off, non-finite sampling values and never-fitting requests are 400s."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.cli import parse_settings
from tests.harness import ServerProcess, running_server
from tests.server.conftest import MAX_NUM_SEQS, MAX_WAITING

KEY_A, KEY_B, ADMIN = "key-alpha", "key-beta", "admin-key"


@pytest.fixture(scope="module")
def tenants(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("tenants")
    args = ["--session-dir", str(work / "sessions"), "--admin-api-key", ADMIN]
    with running_server(model_dir, work / "server.log", args, api_keys=(KEY_A, KEY_B)) as process:
        yield process


def call(server: ServerProcess, key: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def cached(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_concurrent_saves_of_one_name_all_succeed_and_the_file_loads(tenants: ServerProcess) -> None:
    prompt = [1, *range(600, 700)]
    assert call(tenants, KEY_A, "/v1/completions", {"prompt": prompt, "max_tokens": 4}).status_code == 200
    body = {"name": "race", "prompt": prompt}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: call(tenants, KEY_A, "/v1/sessions/save", body).status_code, range(48)))
    assert statuses == [200] * 48
    assert call(tenants, KEY_A, "/v1/sessions/load", {"name": "race"}).status_code == 200


def test_sessions_belong_to_the_key_that_saved_them(tenants: ServerProcess) -> None:
    prompt = [1, *range(800, 870)]
    assert call(tenants, KEY_A, "/v1/completions", {"prompt": prompt, "max_tokens": 2}).status_code == 200
    saved = call(tenants, KEY_A, "/v1/sessions/save", {"name": "mine", "prompt": prompt})
    assert saved.status_code == 200, saved.text
    tenant = saved.json()["tenant"]
    assert tenant and KEY_A not in tenant  # a public name, never the key
    other = call(tenants, KEY_B, "/v1/sessions/load", {"name": "mine"})
    assert other.status_code == 404  # another key cannot see it ...
    overwrite = call(tenants, KEY_B, "/v1/sessions/save", {"name": "mine", "prompt": prompt})
    assert overwrite.status_code == 400  # ... nor overwrite it (B has no cached state: caches are per key too)
    assert call(tenants, KEY_B, "/v1/sessions/load", {"name": f"{tenant}/mine"}).status_code == 400
    admin = call(tenants, ADMIN, "/v1/sessions/load", {"name": f"{tenant}/mine"})
    assert admin.status_code == 200 and admin.json()["tenant"] == tenant
    # the admin restored it into A's namespace: A's next turn resumes from it
    assert cached(call(tenants, KEY_A, "/v1/completions", {"prompt": prompt + [5, 6], "max_tokens": 1})) > 0


def test_cached_prefixes_are_per_key_and_per_cache_salt(tenants: ServerProcess) -> None:
    prompt = [1, *range(1000, 1150)]
    first = {"prompt": prompt, "max_tokens": 2}
    assert cached(call(tenants, KEY_A, "/v1/completions", first)) == 0
    assert cached(call(tenants, KEY_A, "/v1/completions", first)) == len(prompt)
    assert cached(call(tenants, KEY_B, "/v1/completions", first)) == 0  # B learns nothing of A's prompt
    salted = {**first, "cache_salt": "A"}
    assert cached(call(tenants, KEY_A, "/v1/completions", salted)) == 0
    assert cached(call(tenants, KEY_A, "/v1/completions", {**first, "cache_salt": "B"})) == 0
    assert cached(call(tenants, KEY_A, "/v1/completions", salted)) == len(prompt)
    chat = {"messages": [{"role": "user", "content": "salted chat " * 20}], "max_tokens": 2, "cache_salt": "C"}
    assert cached(call(tenants, KEY_A, "/v1/chat/completions", chat)) == 0
    assert cached(call(tenants, KEY_A, "/v1/chat/completions", {**chat, "cache_salt": "D"})) == 0


@pytest.mark.parametrize(("argv", "why"), [(["--api-key", " "], "holds no API key"),
                                           (["--api-key", ","], "holds no API key"),
                                           (["--api-key", " , ,"], "holds no API key"),
                                           (["--admin-api-key", "  "], "admin_api_key is blank")])
def test_blank_api_keys_are_refused_at_start(argv: list[str], why: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv)
    assert info.value.code == 2 and why in capsys.readouterr().err


def test_a_key_file_of_blank_lines_is_refused_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\n  \n,\n")
    with pytest.raises(SystemExit) as info:
        parse_settings(["--api-key-file", str(keys)])
    assert info.value.code == 2 and "holds no API key" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "presence_penalty", "min_p"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_sampling_values_are_400(http: httpx.Client, field: str, value: str) -> None:
    # Python's JSON parser (the server's) reads these literals; strict encoders will not write them
    body = f'{{"prompt": [1, 2, 3], "max_tokens": 2, "{field}": {value}}}'.encode()
    response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "finite" in error["message"]


def test_a_request_that_can_never_fit_is_400_not_429(http: httpx.Client) -> None:
    capacity = MAX_NUM_SEQS + MAX_WAITING
    too_many = http.post("/v1/completions", json={"prompt": [[1, 2]] * (capacity + 1), "max_tokens": 1})
    assert too_many.status_code == 400 and f"at most {capacity}" in too_many.json()["error"]["message"]
    with_n = http.post("/v1/completions", json={"prompt": [[1, 2]] * 4, "n": 3, "max_tokens": 1})
    assert with_n.status_code == 400 and "Retry-After" not in with_n.headers
