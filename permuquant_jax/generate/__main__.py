"""`python -m permuquant_jax.generate`."""

import sys

from permuquant_jax.generate.cli import main

sys.exit(main())
