"""The optional compiled build (docs/architecture.md, "Two builds").

`pip install -e .` and every plain build use pyproject.toml alone and stay
pure Python: this file adds extensions only when FASTIMDS_MYPYC=1 asks for
them (`make mypyc`, which builds them in place; `make mypyc-clean` removes
them). Then mypyc compiles HOT_MODULES, the connection and what it calls
per request, into C extensions that Python imports in place of the .py
files beside them; everything else stays Python.
"""

from __future__ import annotations

import os

from setuptools import setup

# The connection's parts (one chain over one slots layout) and the per-request
# code they call. Order does not matter: mypyc compiles them as one group.
HOT_MODULES = [
    "fastimds/http/fields.py",
    "fastimds/http/phases.py",
    "fastimds/http/request_head.py",
    "fastimds/http/memo.py",
    "fastimds/http/holds.py",
    "fastimds/http/answer.py",
    "fastimds/http/caller_owner.py",
    "fastimds/http/turns.py",
    "fastimds/http/connection.py",
    "fastimds/http/worker_state.py",
    "fastimds/http/throttle.py",
]

# mypyc's runtime shared by the group, named inside the package (fastimds/http/hot__mypyc.*.so):
# by default it is a top-level module beside setup.py, which an installed package cannot import.
SHARED_LIB = "fastimds.http.hot"

if os.environ.get("FASTIMDS_MYPYC") == "1":
    from mypyc.build import mypycify

    setup(ext_modules=mypycify(HOT_MODULES, opt_level="3", group_name=SHARED_LIB))
else:
    setup()
