"""``python -m gptforge`` runs the CLI (and is what ``torchrun -m gptforge`` launches)."""

import sys

from gptforge.cli import main

sys.exit(main())
