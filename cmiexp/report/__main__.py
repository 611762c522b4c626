"""``python -m cmiexp.report`` is ``cmiexp-report``."""

import sys

from cmiexp.report.cli import main

sys.exit(main())
