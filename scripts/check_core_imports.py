"""`import oncely` must work with no extra installed: the core needs only the standard library.

Runs a fresh interpreter with site-packages hidden, so any third-party import in the core fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "import oncely, oncely.asgi, oncely.stores.memory, oncely.stores.sqlite; "
    "banned = {'psycopg', 'redis', 'httpx', 'starlette', 'anyio'} & set(sys.modules); "
    "sys.exit(f'core imported {sorted(banned)}' if banned else 0)"
)

result = subprocess.run([sys.executable, "-S", "-c", CODE, str(SRC)], check=False)
if result.returncode:
    sys.exit("import oncely needs more than the standard library")
print("core imports: standard library only")
