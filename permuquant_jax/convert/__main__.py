"""`python -m permuquant_jax.convert --help`."""

import os
import sys

from permuquant_jax.convert.cli import main

code = main()
# Leave without interpreter teardown: with XLA's and orbax's threads still alive it can crash
# (a segfault after "nothing was written"). Everything of ours is closed and flushed by now.
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except (OSError, ValueError):
        pass
os._exit(code)
