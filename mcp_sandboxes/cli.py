"""The `mcp-sandboxes` command: serve (stdio | http), token, doctor; the terminal view of a running
server or of the data directory (sessions, logs, transcript, stop, shell, envs); images build."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import anyio

from mcp_sandboxes import __version__
from mcp_sandboxes.cli_views import VIEW_COMMANDS, add_view_commands, run_view_command
from mcp_sandboxes.config import load_settings
from mcp_sandboxes.errors import McpSandboxesError
from mcp_sandboxes.images import add_image_commands, run_image_command


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
    serve.add_argument(
        "--web-port",
        type=int,
        help="stdio only: also serve the web view on 127.0.0.1:PORT (the HTTP transport serves it at /)",
    )

    token = commands.add_parser(
        "token", help="print the operator token the HTTP transport requires (made on first use)"
    )
    token.add_argument("--config", help="TOML file overriding the embedded defaults")

    doctor = commands.add_parser("doctor", help="report which providers and agent CLIs are usable here")
    doctor.add_argument("--config", help="TOML file overriding the embedded defaults")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--image", action="append", dest="images", help="image to look for agent CLIs in (repeatable)")
    add_view_commands(commands)
    add_image_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "images":  # needs no settings (and MCP_SANDBOXES_CACHE is no setting)
        return run_image_command(args)
    try:
        settings = load_settings(getattr(args, "config", None))
    except McpSandboxesError as exc:
        sys.stderr.write(f"mcp-sandboxes: {exc}\n")
        return 2
    if args.command in VIEW_COMMANDS:
        return run_view_command(args, settings)
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
            if args.web_port is not None and args.transport != "stdio":
                sys.stderr.write("mcp-sandboxes: --web-port is for stdio; over HTTP the web view is at / already\n")
                return 2
            anyio.run(
                lambda: serve(
                    settings, args.transport, host=args.host, port=args.port, auth_token=token, web_port=args.web_port
                )
            )
        except KeyboardInterrupt:
            return 130
        except McpSandboxesError as exc:
            sys.stderr.write(f"mcp-sandboxes: {exc}\n")
            return 1
        except BaseExceptionGroup as group:
            # An error from a task (a listener, the store) arrives wrapped; say it plainly.
            if group.split(KeyboardInterrupt)[0] is not None:
                return 130
            matched, _ = group.split(McpSandboxesError)
            if matched is None:
                raise
            for error in _leaves(matched):
                sys.stderr.write(f"mcp-sandboxes: {error}\n")
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
        document = {**report.model_dump(), "problems": report.problems}
        sys.stdout.write(json.dumps(document, indent=2) + "\n" if args.json else format_report(report))
        return 0 if report.ok else 1
    return 2


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


if __name__ == "__main__":
    raise SystemExit(main())
