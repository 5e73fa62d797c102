"""CLI commands of the harnesses: compare, train, bench (added to the ``seqzoo`` parser)."""

from __future__ import annotations


def add_commands(sub) -> None:
    """Add the harness subcommands to the ``seqzoo`` argument parser."""
