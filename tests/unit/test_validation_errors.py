"""``errors.validation_errors``: the one formatter of pydantic's errors, for the API's 422s, the
fleet file, the settings and the CLI's flags alike."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, model_validator

from sdfleet.errors import validation_errors
from sdfleet.tasks import TaskParams


def _error(model: type[BaseModel], **data: object) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        model.model_validate(data)
    return e.value


class Either(BaseModel):
    value: int | bool


class Whole(BaseModel):
    a: int = 0

    @model_validator(mode="after")
    def _check(self) -> Whole:
        if self.a < 0:
            raise ValueError("a must not be negative")
        return self


def test_our_own_checks_speak_for_themselves() -> None:
    # Not "Value error, must be …, got 13 (got 13)": our ValueError names what it refused.
    e = _error(TaskParams, width=13, steps=0)
    assert validation_errors(e) == (
        "steps: Input should be greater than or equal to 1 (got 0); width: must be a multiple of 8, got 13"
    )


def test_a_unions_members_are_one_place() -> None:
    e = _error(Either, value="x")
    assert validation_errors(e) == (
        "value: Input should be a valid integer, unable to parse string as an integer "
        "or a valid boolean, unable to interpret input (got 'x')"
    )


def test_places_are_named_as_the_caller_names_them() -> None:
    e = _error(TaskParams, steps=151, cfg_scale=-1)
    flags = {"steps": "--steps", "cfg_scale": "--cfg"}
    assert validation_errors(e, lambda loc: flags[str(loc[0])]) == (
        "--steps: Input should be less than or equal to 150 (got 151); "
        "--cfg: Input should be greater than or equal to 0 (got -1)"
    )
    whole = _error(Whole, a=-1)
    assert validation_errors(whole) == "a must not be negative"
    assert validation_errors(whole, whole="body") == "body: a must not be negative"


def test_long_inputs_are_not_quoted_and_five_places_at_most() -> None:
    e = _error(TaskParams, prompt=["x"], steps="y" * 100, width="a", height="b", seed="c", batch_size="d")
    said = validation_errors(e)
    assert said.count(";") == 4 and "y" * 100 not in said and "batch_size" not in said, said
