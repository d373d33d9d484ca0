"""``python -m sdstack``: the same as the ``sdstack`` command."""

import sys

from sdstack.cli import main

sys.exit(main())
