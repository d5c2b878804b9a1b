"""A scripted model server for tests: vendor-neutral `Script`/`Reply` rules, vendor wire
formats as route modules (anthropic.py, ...), one loopback `ScriptedModelServer`."""

from tests.support.model_server.core import (
    ApiError,
    ModelRequest,
    RecordedRequest,
    Recorder,
    Reply,
    Responder,
    Script,
    ToolCall,
)
from tests.support.model_server.server import VENDORS, ScriptedModelServer, build_app

__all__ = [
    "VENDORS",
    "ApiError",
    "ModelRequest",
    "RecordedRequest",
    "Recorder",
    "Reply",
    "Responder",
    "Script",
    "ScriptedModelServer",
    "ToolCall",
    "build_app",
]
