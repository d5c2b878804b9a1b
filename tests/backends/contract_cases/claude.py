"""Claude Code 2.1.197 (recorded): `system/init` names the session, `result` ends the turn."""

from tests.backends.contract_cases import ContractCase, fixture_line

CASE = ContractCase(
    backend="claude",
    init=fixture_line("claude", "plain-text", type="system", subtype="init"),
    result=fixture_line("claude", "plain-text", type="result"),
    native_id="545bd8a6-9972-40f3-a954-79fdab537017",
)
