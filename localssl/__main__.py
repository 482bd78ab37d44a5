import sys

from localssl.cli import main

sys.exit(main())
