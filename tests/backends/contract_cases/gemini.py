"""Gemini CLI 0.61.0 (recorded): `init` names the session, `result` ends the turn."""

from tests.backends.contract_cases import ContractCase, fixture_line

CASE = ContractCase(
    backend="gemini",
    init=fixture_line("gemini", "plain-text", type="init"),
    result=fixture_line("gemini", "plain-text", type="result"),
    native_id="9d8b9eca-8b8f-4c22-9c4e-34c24f2f3f7b",
)
