"""Base class for every params.yaml section: strict types, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A validated, immutable block of params.yaml.

    strict: YAML already gives real types, so "3" is not silently an int and `true` is not an int.
    extra="forbid": a misspelt key is an error, not a silently ignored knob.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
