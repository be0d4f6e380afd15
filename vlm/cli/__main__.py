"""``python -m vlm.cli ...`` (``torchrun -m vlm.cli train ...``): the ``vlm`` command."""

import sys

from vlm.cli import main

sys.exit(main())
