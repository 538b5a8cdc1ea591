"""``python -m dataflare``: the ``dataflare`` command."""

import sys

from dataflare.cli import main

sys.exit(main())
