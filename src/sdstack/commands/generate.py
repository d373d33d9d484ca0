"""PLACEHOLDER: the `sdstack generate` command group (being written)."""


def register(subparsers) -> None:
    """Add this group's parsers."""
