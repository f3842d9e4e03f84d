"""Imports every command module so that each registers its command on the app."""

from lorakit.cli import (  # noqa: F401
    compare,
    demo,
    dpo,
    eval,
    export,
    generate,
    grpo,
    inspect,
    merge,
    serve,
    train,
    version,
)
