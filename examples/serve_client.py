"""Talk to `lorakit serve` with the official OpenAI client: one adapter per request, streaming too.

    lorakit serve --adapter dates=runs/dates/adapter        # in another terminal
    python examples/serve_client.py [--url http://127.0.0.1:8000/v1] [--adapter dates]
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument(
        "--adapter", default=None, help="adapter name (default: the first adapter the server lists)"
    )
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key="unused")
    names = [m.id for m in client.models.list().data]  # the base model's name first, then the adapters
    print("served models:", ", ".join(names))
    adapter = args.adapter or names[-1]
    question = [{"role": "user", "content": "Normalize this date: 5th of March 2021"}]
    for model in ("base", adapter):
        reply = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24)
        print(f"{model:>10}: {reply.choices[0].message.content}")
    print(f"{adapter:>10} (streamed): ", end="", flush=True)
    for chunk in client.chat.completions.create(
        model=adapter, messages=question, temperature=0, max_tokens=24, stream=True
    ):
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
