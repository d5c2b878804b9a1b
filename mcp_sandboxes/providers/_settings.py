"""Provider settings from the config file, validated by the provider's pydantic model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mcp_sandboxes.errors import InvalidInputError

SettingsT = TypeVar("SettingsT", bound=BaseModel)


def validated(model: type[SettingsT], settings: Mapping[str, Any], provider: str) -> SettingsT:
    """The settings as `model`, or an error naming the first bad field (providers.<provider>.<field>)."""
    try:
        return model.model_validate(dict(settings))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidInputError(f"providers.{provider}.{field}", f"{first['msg']} (fix the config file)") from exc
