"""``python -m lipfast``: the same as the ``lipfast`` command."""

import sys

from .cli import main

sys.exit(main())
