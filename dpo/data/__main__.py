"""`python -m dpo.data`: tokenize a dataset as training will and report what is kept (dpo.data.cli)."""

import sys

from dpo.data.cli import main

sys.exit(main())
