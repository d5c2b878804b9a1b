"""OpenCode 1.18.33 (recorded): every line names the session; `step_start` opens a step and
`step_finish` closes it (the turn ends when the process does)."""

from tests.backends.contract_cases import ContractCase, fixture_line

CASE = ContractCase(
    backend="opencode",
    init=fixture_line("opencode", "plain-text", type="step_start"),
    result=fixture_line("opencode", "plain-text", type="step_finish"),
    native_id="ses_dfae4b9aeffelueJMZ3J09bE0X",
)
