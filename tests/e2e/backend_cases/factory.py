from __future__ import annotations

import json
from typing import Any

from tests.e2e.backend_cases import BackendCase
from tests.support.model_server import ToolCall, anthropic

MODEL = "claude-scripted"


def _server_env(url: str) -> dict[str, str]:
    # A BYOK custom model (provider anthropic) on the scripted server: droid needs no Factory
    # account, and with no FACTORY_API_KEY the second turn resumes with --fork (local only).
    settings = {
        "customModels": [
            {
                "model": MODEL,
                "displayName": "Scripted",
                "baseUrl": url,
                "apiKey": "sk-test-not-a-real-key",
                "provider": "anthropic",
                "maxOutputTokens": 4096,
            }
        ]
    }
    return {"MCP_SANDBOXES_BACKENDS__FACTORY__DROID_SETTINGS": json.dumps(settings)}


def _history(body: Any) -> str:
    return json.dumps(body.get("messages", []) if isinstance(body, dict) else body)


CASES = [
    BackendCase(
        backend="factory",
        vendors=[anthropic],
        server_env=_server_env,
        shell_call=lambda command: ToolCall(name="Execute", arguments={"command": command}),
        spawn_args={"model": f"custom:{MODEL}", "permission_mode": "bypassPermissions"},
        history_probe=_history,
    )
]
