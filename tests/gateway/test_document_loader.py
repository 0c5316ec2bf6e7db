"""The kernel's document loader on its own: any pydantic model, any kind of document, every problem located.

The store config, device profiles and scenarios are tested through their own loaders (test_config.py,
tests/drivers/test_profile_errors.py, tests/simulators/test_scenarios.py); this holds what each of them relies on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.loader import DocumentError, DocumentKind, DocumentLoader, load_document
from gateway.kernel.model import StrictModel

KIND = DocumentKind("recipe", "recipes/tea.yaml", 1024)


class Step(StrictModel):
    minutes: int = Field(ge=0, description="How long, in whole minutes.")
    heat: Literal["low", "high"] = "low"


class Recipe(StrictModel):
    name: str
    steps: list[Step] = Field(default_factory=list)
    codes: dict[int, str] = Field(default_factory=dict, description="Error codes the kettle shows.")


class RecipeError(DocumentError):
    noun = "recipe"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tea.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_document_is_validated_and_numbered_keys_stay_numbers(tmp_path: Path) -> None:
    path = write(
        tmp_path, "name: tea\nsteps:\n  - {minutes: 3, heat: high}\ncodes: {0x10: too hot, 2: empty}\n"
    )
    recipe = load_document(path, Recipe, KIND)
    assert recipe == Recipe(
        name="tea", steps=[Step(minutes=3, heat="high")], codes={16: "too hot", 2: "empty"}
    )


def test_every_problem_at_once_with_line_key_path_and_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "name: tea\nsteps:\n  - {minutes: -1}\n  - {minutes: 2, heat: max}\nsugar: 2\n")
    with pytest.raises(RecipeError) as info:
        load_document(path, Recipe, KIND, error=RecipeError)
    error = info.value
    assert isinstance(error, StoreGatewayError)
    assert error.args == ("3 recipe problem(s)",)
    assert str(error).splitlines() == [
        f"{path}:3:6: steps[0].minutes: -1 -> Input should be greater than or equal to 0 (hint: How long, in "
        "whole minutes.)",
        f"{path}:4:18: steps[1].heat: 'max' -> Input should be 'low' or 'high' (hint: allowed values: 'low', "
        "'high')",
        f"{path}:5:1: sugar: 2 -> Extra inputs are not permitted (hint: allowed keys here: name, steps, codes)",
    ]


@pytest.mark.parametrize(
    ("raw", "line", "message", "hint"),
    [
        (b"", 1, "the recipe file is empty", "start from recipes/tea.yaml"),
        (b"- tea\n", 1, "the recipe must be a mapping of keys to values", "see recipes/tea.yaml"),
        (b"name: a\n---\nname: b\n", 2, "a second YAML document starts here", "one recipe per file"),
        (b"name: a\nname: b\n", 2, "duplicate key 'name' (first at line 1)", "keep one of them"),
        (b"name: caf\xe9\n", 1, "the file is not valid UTF-8", "save it as UTF-8"),
        (b"name: " + b"a" * 1024, None, "the recipe file is larger than 1024 bytes", None),
    ],
)
def test_what_the_yaml_itself_gets_wrong_is_named_for_the_kind_of_document(
    tmp_path: Path, raw: bytes, line: int | None, message: str, hint: str | None
) -> None:
    path = tmp_path / "tea.yaml"
    path.write_bytes(raw)
    for given in (None, raw):  # read by the loader, or bytes the caller read
        with pytest.raises(DocumentError) as info:
            DocumentLoader(path, KIND).read(given)
        [issue] = info.value.issues
        assert issue.line == line
        assert message in issue.message
        assert (issue.hint or "").startswith(hint or "")


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DocumentError) as info:
        load_document(tmp_path / "nope.yaml", Recipe, KIND)
    [issue] = info.value.issues
    assert str(issue).startswith(f"{tmp_path / 'nope.yaml'}: cannot read the recipe file: ")
    assert issue.hint == "check the path"


def test_a_check_of_the_caller_joins_the_issues_of_the_document(tmp_path: Path) -> None:
    path = write(tmp_path, "name: coffee\nsteps: []\n")
    loader = DocumentLoader(path, KIND)
    data = loader.read()
    assert data["name"] == "coffee"
    error = loader.fail(("name",), "this is a tea recipe", "write 'name: tea'", value=data["name"])
    assert str(error) == f"{path}:1:1: name: 'coffee' -> this is a tea recipe (hint: write 'name: tea')"
