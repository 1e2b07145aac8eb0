# Run fastimds on the stdlib asyncio loop instead of uvloop (tuning experiment).
import asyncio, sys
import uvloop

uvloop.run = lambda main, **kw: asyncio.run(main)
from fastimds.cli import main

sys.exit(main(sys.argv[1:]))
