"""A custom JSONL command (no recording: the lines are the protocol of custom.py's docstring).
Its default table has no command, so the case names one; it never runs here."""

import json

from tests.backends.contract_cases import ContractCase

CASE = ContractCase(
    backend="custom",
    settings={"argv": ["my-agent", "--json", "{prompt}"]},
    init=json.dumps({"type": "session.native_id", "id": "native-7"}),
    result=json.dumps({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}),
    native_id="native-7",
)
