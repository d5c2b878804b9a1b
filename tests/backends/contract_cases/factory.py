"""Factory Droid 0.225.2 (recorded): `system/init` names the session, `completion` ends the turn."""

from tests.backends.contract_cases import ContractCase, fixture_line

CASE = ContractCase(
    backend="factory",
    init=fixture_line("factory", "plain-text", type="system", subtype="init"),
    result=fixture_line("factory", "plain-text", type="completion"),
    native_id="60902d46-d3b9-4f4c-bee3-9c970fb68a6d",
)
