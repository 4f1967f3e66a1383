"""``clipbatch ARGS`` with the private Redis of ``clipbatch run`` on a given loopback port.

    python -m bench.clipbatch_on_port PORT run embed --input ... --output ...

``clipbatch run`` picks a free port for its redis-server; a bench on a shared machine may only
use the ports it was given. Everything else is the ``clipbatch`` command as a user runs it.
"""
from __future__ import annotations

import sys

from clipbatch.orchestration import embedded


def main() -> None:
    port = int(sys.argv[1])
    embedded._free_port = lambda: port
    from clipbatch.cli import main as clipbatch

    clipbatch(sys.argv[2:], prog_name="clipbatch")


if __name__ == "__main__":
    main()
