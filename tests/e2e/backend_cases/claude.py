from __future__ import annotations

from tests.e2e.backend_cases import BackendCase
from tests.support.model_server import ToolCall, anthropic

CASES = [
    BackendCase(
        backend="claude",
        vendors=[anthropic],
        server_env=lambda url: {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "sk-test-not-a-real-key"},
        shell_call=lambda command: ToolCall(name="Bash", arguments={"command": command}),
        spawn_args={"permission_mode": "bypassPermissions"},
    )
]
