"""fastimds: an Azure-compatible Instance Metadata Service built for throughput."""

from importlib.util import find_spec

__version__ = "0.1.0"


def build_kind() -> str:
    """Which build of the hot modules runs: "mypyc" (compiled in place by `make mypyc`) or "python".

    Python imports a module's C extension in place of its .py file when both
    are there, so the connection's origin says which build this is
    (docs/architecture.md, "Two builds"). Named by string: no import edge.
    """
    spec = find_spec("fastimds.http.connection")
    origin = spec.origin if spec is not None else None
    return "python" if origin is None or origin.endswith(".py") else "mypyc"
