"""``python -m minimind_core`` is the ``minimind`` command."""

import sys

from .cli import main

sys.exit(main())
