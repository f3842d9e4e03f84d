"""Imports every command module so that each registers its command on the app."""

from lorakit.cli import version  # noqa: F401
from lorakit.cli import train  # noqa: F401
