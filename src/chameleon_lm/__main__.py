"""``python -m chameleon_lm``: the ``chameleon`` command, for launchers such as ``torchrun -m``."""

import sys

from chameleon_lm.cli import main

sys.exit(main())
