from __future__ import annotations

from pathlib import Path

import pytest

from mcp_sandboxes.config import load_settings
from mcp_sandboxes.errors import InvalidInputError


def test_embedded_defaults_then_file_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\ndefault_image = "from-file"\nmax_wait_s = 30\n[backends.claude]\ncli_path = "/f"\n')
    settings = load_settings(
        config,
        environ={
            "MCP_SANDBOXES_MAX_WAIT_S": "45",
            "MCP_SANDBOXES_BACKENDS__CLAUDE__ENV__SOME_Var": "1",
            "MCP_SANDBOXES_PROVIDERS__DOCKER__URL": "unix:///x.sock",
        },
    )
    assert settings.server.default_image == "from-file"
    assert settings.server.max_wait_s == 45
    assert settings.backend("claude").cli_path == "/f"
    assert settings.backend("claude").env["SOME_Var"] == "1"
    assert settings.backend("claude").env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert settings.provider("docker")["url"] == "unix:///x.sock"


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"server\.max_wait_s"):
        load_settings(None, environ={"MCP_SANDBOXES_MAX_WAIT_S": "-1"})
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        load_settings(broken, environ={})
