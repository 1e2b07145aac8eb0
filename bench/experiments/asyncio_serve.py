"""Run fastimds on the stdlib asyncio loop instead of uvloop (a tuning.md experiment).

python bench/experiments/asyncio_serve.py serve --port 8080
"""

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

import uvloop

from fastimds.cli.main import main


def _stdlib_run(coroutine: Coroutine[Any, Any, None], **_options: Any) -> None:
    asyncio.run(coroutine)


if __name__ == "__main__":
    uvloop.run = _stdlib_run  # fastimds.process.serve calls uvloop.run at serve time
    sys.exit(main(sys.argv[1:]))
