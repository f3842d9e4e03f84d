"""Imports every command module so that each registers its command on the app."""

from lorakit.cli import compare, demo, dpo, eval, export, generate, inspect, merge, serve, train, version  # noqa: F401
