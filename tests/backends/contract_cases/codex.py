"""Codex 0.169.0 (recorded): `thread.started` names the thread, `turn.completed` ends the turn."""

from tests.backends.contract_cases import ContractCase, fixture_line

CASE = ContractCase(
    backend="codex",
    init=fixture_line("codex", "plain-text", type="thread.started"),
    result=fixture_line("codex", "plain-text", type="turn.completed"),
    native_id="01a2051c-a0ca-7353-9305-e19c1610470f",
)
