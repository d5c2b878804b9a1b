from __future__ import annotations

import json
from typing import Any

from tests.e2e.backend_cases import BackendCase
from tests.support.model_server import ToolCall, openai_responses


def _history(body: Any) -> str:
    # The Responses API sends the whole conversation as `input` items.
    return json.dumps(body.get("input", []), ensure_ascii=False)


# OPENAI_BASE_URL makes the backend write a Responses API provider into the session's Codex
# profile. gpt-5.5 is in Codex's catalog and gets the classic tools, among them exec_command,
# the shell tool the model calls with {"cmd": "..."}.
CASES = [
    BackendCase(
        backend="codex",
        vendors=[openai_responses],
        server_env=lambda url: {"OPENAI_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": "sk-test-not-a-real-key"},
        shell_call=lambda command: ToolCall(name="exec_command", arguments={"cmd": command}),
        spawn_args={"model": "gpt-5.5"},
        history_probe=_history,
    )
]
