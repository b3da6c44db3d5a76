"""`python -m src.training --inputs inputs.json --output weights.tar`: see src/training/cli.py."""

import sys

from src.training.cli import main

sys.exit(main())
