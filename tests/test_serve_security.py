"""`lorakit serve` is safe by default: the API key on every route, only JSON bodies, Host and Origin checked
(cross-site requests and DNS rebinding fail), runtime adapter loading off unless an adapter root is given
and then confined to it, and no filesystem paths in answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_support import Running, save_adapter  # noqa: E402

CHAT = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def outside(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter outside any adapter root."""
    return save_adapter(tiny_chat_model_dir, tmp_path_factory.mktemp("outside") / "stray", 2, 7)


@pytest.fixture(scope="module")
def root(outside: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root: a good adapter, a symlink to the outside one, and one whose weights link outside."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(outside, root / "good")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "sneaky").mkdir()
    shutil.copy(outside / "adapter_config.json", root / "sneaky")
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def default(tiny_chat_model_dir: Path):
    server = Running.start(tiny_chat_model_dir, [], max_model_len=64)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(tiny_chat_model_dir: Path, root: Path):
    server = Running.start(tiny_chat_model_dir, [], max_model_len=64, api_key="sekrit", adapter_root=root)
    yield server
    server.stop()


ROUTES = [("GET", "/v1/models", None), ("GET", "/health", None), ("GET", "/metrics", None),
          ("POST", "/v1/chat/completions", CHAT), ("POST", "/v1/completions", {"model": "base",
                                                                               "prompt": "x"}),
          ("POST", "/v1/adapters", {"name": "a", "path": "good"}), ("DELETE", "/v1/adapters/a", None),
          ("GET", "/v1/nothing", None)]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_api_key_is_required_on_every_route(keyed: Running, method: str, path: str, body) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"},
                    {"Authorization": "Basic sekrit"}):
        status, error = keyed.raw(method, path, body, headers)
        assert status == 401 and error["error"]["code"] == "invalid_api_key", (headers, error)
    status, _ = keyed.raw(method, path, body, {"Authorization": "Bearer sekrit"})
    assert status != 401
    if path == "/v1/adapters":
        assert keyed.raw("DELETE", "/v1/adapters/a", None, {"Authorization": "Bearer sekrit"})[0] == 200


def test_openai_client_with_the_key(keyed: Running) -> None:
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sekrit", max_retries=0)
    assert client.chat.completions.create(**CHAT).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="guess", max_retries=0).models.list()


def test_cross_site_simple_requests_do_nothing(default: Running, root: Path) -> None:
    """The issue's attack: a web page POSTs text/plain with its own Origin (and, rebound, its own Host)."""
    steps = default.server.scheduler.steps
    attacks = [{"Content-Type": "text/plain", "Origin": "http://evil.example"},
               {"Content-Type": "text/plain", "Origin": "http://evil.example",
                "Host": f"evil.example:{default.port}"},
               {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"},
               {"Origin": "http://evil.example"}, {"Origin": "null"},
               {"Host": f"rebound.evil.example:{default.port}"}]
    for headers in attacks:
        for path, body in (("/v1/adapters", {"name": "a", "path": str(root / "good")}),
                           ("/v1/chat/completions", CHAT)):
            status, error = default.raw("POST", path, json.dumps(body).encode(), headers)
            assert status in (400, 403, 415), (headers, status)
            assert error["error"]["code"] in ("invalid_host", "origin_not_allowed", "unsupported_media_type")
    assert default.raw("GET", "/v1/models", None, {"Host": "rebound.evil.example"})[0] == 400
    assert default.server.scheduler.steps == steps and default.server.pool.names() == []
    # The server's own origin and plain local clients work.
    for headers in ({"Origin": f"http://127.0.0.1:{default.port}"}, {"Host": f"localhost:{default.port}"},
                    {"Content-Type": "application/json; charset=utf-8"}):
        assert default.raw("POST", "/v1/chat/completions", CHAT, headers)[0] == 200, headers


def test_allowed_origins(tiny_chat_model_dir: Path) -> None:
    server = Running.start(tiny_chat_model_dir, [], max_model_len=64,
                           allowed_origins=("http://app.example:3000",))
    try:
        ok = {"Origin": "http://app.example:3000", "Host": f"app.example:{server.port}"}
        assert server.raw("POST", "/v1/chat/completions", CHAT, ok)[0] == 200
        status, _ = server.raw("OPTIONS", "/v1/chat/completions", None, {
            "Origin": "http://app.example:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert status == 200
        assert server.raw("POST", "/v1/chat/completions", CHAT, {"Origin": "http://evil.example"})[0] == 403
        assert server.raw("POST", "/v1/chat/completions", CHAT, {"Host": "evil.example"})[0] == 400
    finally:
        server.stop()


def test_runtime_adapter_loading_is_off_by_default(default: Running, root: Path) -> None:
    status, error = default.raw("POST", "/v1/adapters", {"name": "a", "path": str(root / "good")})
    assert status == 403 and error["error"]["code"] == "adapter_loading_disabled"
    assert default.server.pool.names() == []


def test_adapter_root_confines_loading(keyed: Running, root: Path, outside: Path) -> None:
    auth = {"Authorization": "Bearer sekrit"}
    refusals = {}
    for path in ["link", "sneaky", "../" + outside.parent.name + "/stray", str(outside), "good/../../x",
                 "missing",
                 str(root / "link")]:
        status, error = keyed.raw("POST", "/v1/adapters", {"name": "a", "path": path}, auth)
        assert status == 400 and error["error"]["code"] == "invalid_adapter_path", (path, error)
        refusals[path] = error["error"]["message"].removeprefix(path)
    assert len(set(refusals.values())) == 1  # "outside" and "missing" read the same: no probing
    for path in ("good", str(root / "good"), "./good/"):
        status, body = keyed.raw("POST", "/v1/adapters", {"name": "a", "path": path}, auth)
        assert status == 200, (path, body)
        listing = keyed.raw("GET", "/v1/models", None, auth)[1]
        assert [m["id"] for m in listing["data"]][1:] == ["a"]
        assert str(root) not in json.dumps(listing)
        assert "/" not in json.dumps([m["root"] for m in listing["data"]])
        assert keyed.raw("DELETE", "/v1/adapters/a", None, auth)[0] == 200
