"""Command groups of the ``sdstack`` CLI; each module has ``register(subparsers)``."""
