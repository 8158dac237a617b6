"""``python -m cloud_sync.store``: the same as the ``customer-store`` command."""

import sys

from cloud_sync.store.cli import main

sys.exit(main())
