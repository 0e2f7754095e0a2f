"""``python -m kvswap.testing.servers up|down --dir DIR``."""

import sys

from kvswap.testing.servers import main

sys.exit(main())
