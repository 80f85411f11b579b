"""``errors.validation_errors``: the one formatter of pydantic's errors, for the API's 422s, the
fleet file, the settings and the CLI's flags alike."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from sdfleet.errors import pattern_words, validation_errors
from sdfleet.tasks import TENANT_PATTERN, TaskParams


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


def _patterns(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
        return found.union(*(_patterns(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_patterns(v) for v in node))
    return set()


def test_every_pattern_a_client_or_a_fleet_file_can_meet_is_said_in_words() -> None:
    """A refused value is said as what it should be, not as the regular expression (the seed's
    ``image_link`` answered with 600 characters of one)."""
    from sdfleet.api.app import build_app
    from sdfleet.settings import FleetConfig, Settings

    app = build_app(Settings().api, FleetConfig(), None)  # type: ignore[arg-type]  # not served
    patterns = _patterns(app.openapi()) | _patterns(Settings.model_json_schema())
    patterns |= _patterns(FleetConfig.model_json_schema())
    assert len(patterns) >= 6 and not {p for p in patterns if pattern_words(p) is None}


def test_a_worded_pattern_says_its_words_and_what_was_sent() -> None:
    from sdfleet.api.seed_schemas import ContentScripts

    class Owner(BaseModel):
        tenant: str = Field(pattern=TENANT_PATTERN)

    said = validation_errors(_error(Owner, tenant="acme corp"))
    assert said == (
        "tenant: String should be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit "
        "(got 'acme corp')"
    )
    said = validation_errors(_error(ContentScripts, image_link="ftp://x/y.png"))
    assert said == "image_link: String should be an http(s) URL or s3://bucket/key (got 'ftp://x/y.png')"
