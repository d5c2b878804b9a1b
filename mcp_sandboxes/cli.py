"""The `mcp-sandboxes` command: serve (stdio | http) and doctor."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import anyio

from mcp_sandboxes import __version__
from mcp_sandboxes.config import load_settings
from mcp_sandboxes.errors import McpSandboxesError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-sandboxes", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mcp-sandboxes {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the MCP server")
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    serve.add_argument("--config", help="TOML file overriding the embedded defaults")
    serve.add_argument("--log-level", default=os.environ.get("MCP_SANDBOXES_LOG_LEVEL", "WARNING"))

    token = commands.add_parser(
        "token", help="print the operator token the HTTP transport requires (made on first use)"
    )
    token.add_argument("--config", help="TOML file overriding the embedded defaults")

    doctor = commands.add_parser("doctor", help="report which providers and agent CLIs are usable here")
    doctor.add_argument("--config", help="TOML file overriding the embedded defaults")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--image", action="append", dest="images", help="image to look for agent CLIs in (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except McpSandboxesError as exc:
        sys.stderr.write(f"mcp-sandboxes: {exc}\n")
        return 2
    if args.command == "serve":
        # stdout belongs to the MCP protocol on stdio: logs go to stderr only.
        logging.basicConfig(
            level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
        from mcp_sandboxes.server.app import serve

        token = settings.server.auth_token or None
        if args.transport == "http" and args.host not in ("127.0.0.1", "localhost", "::1") and not token:
            sys.stderr.write(
                "mcp-sandboxes: refusing to serve on a non-loopback address without MCP_SANDBOXES_AUTH_TOKEN set\n"
            )
            return 2
        try:
            anyio.run(lambda: serve(settings, args.transport, host=args.host, port=args.port, auth_token=token))
        except KeyboardInterrupt:
            return 130
        except McpSandboxesError as exc:
            sys.stderr.write(f"mcp-sandboxes: {exc}\n")
            return 1
        return 0
    if args.command == "token":
        from mcp_sandboxes.server.auth import load_or_create_operator_token

        if settings.server.auth_token:
            sys.stdout.write(settings.server.auth_token + "\n")
            return 0
        try:
            sys.stdout.write(load_or_create_operator_token(settings.server.operator_token_path) + "\n")
        except (McpSandboxesError, OSError) as exc:
            sys.stderr.write(f"mcp-sandboxes: {exc}\n")
            return 1
        return 0
    if args.command == "doctor":
        from mcp_sandboxes.doctor import diagnose, format_report

        report = anyio.run(diagnose, settings, args.images)
        sys.stdout.write(json.dumps(report.model_dump(), indent=2) + "\n" if args.json else format_report(report))
        return 0 if report.ok else 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
