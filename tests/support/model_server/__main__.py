"""Run the scripted model server as a process, for benchmarks and manual runs:

    python -m tests.support.model_server --port 8765 --script script.json

The script file format is described in `Script.from_dict`. The server prints its URL on
one line when it is ready, then serves until interrupted (SIGINT/SIGTERM)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tests.support.model_server.core import Script
from tests.support.model_server.server import ScriptedModelServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.model_server", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick a free one)")
    parser.add_argument("--script", help="JSON script file (default: every request gets the fallback reply)")
    args = parser.parse_args(argv)
    script = Script.load(args.script) if args.script else Script()
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    with ScriptedModelServer(script, port=args.port) as server:
        sys.stdout.write(server.url + "\n")
        sys.stdout.flush()
        done.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
