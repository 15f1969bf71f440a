"""`python -m permuquant_jax.convert --help`."""

import sys

from permuquant_jax.convert.cli import main

sys.exit(main())
