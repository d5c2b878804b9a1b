from __future__ import annotations

from tests.e2e.backend_cases import BackendCase
from tests.support.model_server import ToolCall, openai_chat

# The default config's `openai-compatible` provider, pointed at the scripted server.
CASES = [
    BackendCase(
        backend="opencode",
        vendors=[openai_chat],
        server_env=lambda url: {
            "OPENAI_COMPATIBLE_BASE_URL": f"{url}/v1",
            "OPENAI_COMPATIBLE_API_KEY": "sk-test-not-a-real-key",
        },
        shell_call=lambda command: ToolCall(name="bash", arguments={"command": command}),
        spawn_args={"model": "openai-compatible/scripted-model"},
    )
]
