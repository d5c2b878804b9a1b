from __future__ import annotations

import json
from typing import Any

from tests.e2e.backend_cases import BackendCase
from tests.support.model_server import ToolCall, gemini


def _history(body: Any) -> str:
    # The whole conversation the resumed CLI sent: prompts, function calls and responses.
    return json.dumps(body.get("contents", []) if isinstance(body, dict) else body)


CASES = [
    BackendCase(
        backend="gemini",
        vendors=[gemini],
        server_env=lambda url: {"GOOGLE_GEMINI_BASE_URL": url, "GEMINI_API_KEY": "test-not-a-real-key"},
        shell_call=lambda command: ToolCall(name="run_shell_command", arguments={"command": command}),
        # No permission_mode: the backend's default is yolo (headless Gemini cannot ask).
        history_probe=_history,
    )
]
