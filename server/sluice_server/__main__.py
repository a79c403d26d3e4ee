"""`python -m sluice_server`: the same as the `sluice-server` command."""

import sys

from .cli import main

sys.exit(main())
