"""``python -m localssl.theory [EXPERIMENT|all] ...``: the same as ``localssl theory``."""
from .cli import main

raise SystemExit(main())
