"""``python -m localssl.reports.bench``: the same as ``localssl bench``."""
import sys

from localssl.reports.bench.cli import main

sys.exit(main())
