"""`python -m dpo.export` (dpo.export.cli)."""

import sys

from dpo.export.cli import main

sys.exit(main())
