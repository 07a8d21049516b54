"""``python -m services.relay``: see :mod:`services.relay.main`."""

import sys

from services.relay.main import main

sys.exit(main())
