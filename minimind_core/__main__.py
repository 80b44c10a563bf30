"""``python -m minimind_core`` is the ``minimind`` command."""

import sys

from .cli.entry import main

sys.exit(main())
