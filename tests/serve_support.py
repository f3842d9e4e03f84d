"""Helpers for the `lorakit serve` tests: random adapters for the tiny chat model, and a real server on
127.0.0.1 (uvicorn in a background thread of the test process) with an openai client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import openai
import torch
import uvicorn

from lorakit import LoraConfig, get_peft_model
from lorakit.models.sources import load_causal_lm
from lorakit.serve.app import create_app
from lorakit.serve.server import Server
from lorakit.serve.settings import ServeSettings


def save_adapter(model_dir: Path, out: Path, rank: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(model_dir), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj", "down_proj",
                                                     "embed_tokens"],
        init_lora_weights=False))
    model.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Running:
    """A server in a background thread of this process, with an openai client and raw HTTP helpers."""

    def __init__(self, server: Server, api_key: str = "x") -> None:
        self.port = free_port()
        self.server = server
        self._uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port,
                                                      log_level="warning"))
        self._thread = threading.Thread(target=self._uvicorn.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    @classmethod
    def start(cls, model_dir: Path, adapters: list[tuple[str, Path]], **settings) -> Running:
        return cls(Server.load(str(model_dir), adapters, ServeSettings(**settings)))

    def raw(self, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
        """(status, JSON body or text) of one request on a fresh connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            return self.send(connection, method, path, body, headers)
        finally:
            connection.close()

    @staticmethod
    def send(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        connection.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                             **(headers or {})})
        response = connection.getresponse()
        text = response.read().decode()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "server did not stop"
