"""README.md and the user docs stay honest where a test can tell.

- README opens with exactly two commands: the demo, and the test suite (``bash .ci/run``).
- Every ``store-gateway ...`` command line in a shell block names a real subcommand and real flags, as the
  real CLI's ``--help`` lists them (``python -m gateway.cli``, so the parsers of ``gateway.cli``,
  ``cloud_bridge.hq.receiver`` and the simulators answer for themselves).
- Every relative link points to an existing file, and an anchor to a heading of that file.
- ``store-gateway check-config --no-secrets firmware_configs/store-example.yaml`` exits 0, as README says.
- The config, profile and scenario examples are valid.
- No user doc carries development history.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from drivers.modbus.profile import ModbusProfile
from gateway.config_loader import check_config
from simulators.scenario_model import available, load_scenario

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "firmware_configs" / "README.md"]
"""The user docs this test keeps honest."""

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_LANGS = frozenset({"bash", "sh", "shell"})
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = frozenset({"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1"})

DEMO_COMMAND = re.compile(
    r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e '\.\[demo\]' && store-gateway demo$"
)
TEST_COMMAND = "bash .ci/run"
EXAMPLE_CHECK = "store-gateway check-config --no-secrets firmware_configs/store-example.yaml"


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def shell_lines(lang: str, body: str) -> list[str]:
    """The logical command lines of a block: continuations joined; in a console block, only ``$ `` lines."""
    lines: list[str] = []
    pending = ""
    for raw in body.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if lang == "console":
            if line.startswith("$ "):
                lines.append(line[2:])
        elif lang in SHELL_LANGS:
            lines.append(line)
    return [line.strip() for line in lines if line.strip()]


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at && | ; and redirections), comments dropped, each
    without its leading ``VAR=value`` assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    found: list[list[str]] = []
    current: list[str] = []
    skip_next = False
    for token in lexer:
        if token in SEPARATORS:
            if current:
                found.append(current)
            current = []
            skip_next = token in {">", ">>", "<", "2>"}  # the redirection's file is no command
            continue
        if skip_next:
            skip_next = False
            continue
        if not current and ENV_ASSIGNMENT.match(token):
            continue
        current.append(token)
    if current:
        found.append(current)
    return found


def gateway_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after ``store-gateway``) of every store-gateway command line in a shell block of a doc."""
    found: list[tuple[str, list[str]]] = []
    for doc in DOCS:
        for lang, body in fenced_blocks(doc.read_text(encoding="utf-8")):
            for line in shell_lines(lang, body):
                for argv in commands(line):
                    if argv[0] == "store-gateway":
                        found.append((f"{rel(doc)}: {line}", argv[1:]))
    return found


def command_path(args: list[str]) -> tuple[str, ...]:
    """The (sub)command a command line runs: ``()``, ``("demo",)``, ``("hq-receiver", "receipt")``,
    ``("simulate", "pos")``, ``("rules", "test")``..."""
    if not args or args[0].startswith("-"):
        return ()
    path = [args[0]]
    rest = args[1:]
    hq_tool = args[0] == "hq-receiver" and rest[:1] in (["receipt"], ["export"])
    with_sub = args[0] in ("simulate", "rules", "broker") and rest and not rest[0].startswith("-")
    if hq_tool or with_sub:
        path.append(rest[0])
    return tuple(path)


@functools.cache
def help_text(path: tuple[str, ...]) -> str:
    """``store-gateway PATH --help`` from the real CLI; fails the test if the (sub)command does not exist."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *path, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"'store-gateway {' '.join(path)} --help' exits {result.returncode}: "
        f"{(result.stderr or result.stdout)[-500:]}"
    )
    return result.stdout


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file (headings inside fenced blocks are not headings)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in text.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return frozenset(found)


# --- README's first screen -----------------------------------------------------------------------------------


def test_readme_opens_with_the_demo_and_the_test_commands() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = fenced_blocks(text)
    assert blocks, "README has no fenced block"
    lang, body = blocks[0]
    assert lang == "bash", f"README's first block is {lang or 'untagged'}, not bash"
    assert text.index("```") < text.index("\n## "), "the two commands come before the first section"
    lines = [line.split(" #")[0].strip() for line in body.splitlines() if line.strip()]
    assert len(lines) == 2, f"README's first block must hold exactly two commands, not {lines}"
    assert DEMO_COMMAND.match(lines[0]), (
        f"the first command runs the demo in the project's .venv: {lines[0]!r}"
    )
    assert lines[1] == TEST_COMMAND, f"the second command runs the tests: {lines[1]!r}"


# --- commands ------------------------------------------------------------------------------------------------


def test_the_docs_show_commands() -> None:
    """The parsing below finds what it should (a broken parser would make the next test pass on nothing)."""
    found = gateway_commands()
    paths = {command_path(args) for _, args in found}
    assert len(found) >= 20, found
    assert {("demo",), ("check-config",), ("hq-receiver",), ("hq-receiver", "receipt")} <= paths, paths
    assert any(where.startswith("README.md") for where, _ in found)


@pytest.mark.parametrize(("where", "args"), gateway_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_names_a_real_subcommand_and_real_flags(where: str, args: list[str]) -> None:
    path = command_path(args)
    known = set(OPTION.findall(help_text(path))) | {"-h", "--help"}
    flags = [arg.split("=", 1)[0] for arg in args if arg.startswith("-") and arg != "-"]
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"{where}: 'store-gateway {' '.join(path)}' has no option {', '.join(unknown)}"
    if path == ("demo",) and "--scenario" in args:
        scenario = args[args.index("--scenario") + 1]
        assert Path(scenario).suffix or scenario in available(), f"{where}: no shipped scenario {scenario!r}"


def test_readme_checks_the_example_config_without_secrets() -> None:
    assert EXAMPLE_CHECK in README.read_text(encoding="utf-8")
    argv = EXAMPLE_CHECK.split()[1:]
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: firmware_configs/store-example.yaml: "), result.stdout


# --- links ---------------------------------------------------------------------------------------------------


def relative_links() -> list[tuple[Path, str]]:
    found = []
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            found.append((doc, target))
    return found


def test_the_docs_link_to_each_other() -> None:
    assert len(relative_links()) >= 30


@pytest.mark.parametrize(
    ("doc", "target"), relative_links(), ids=lambda v: rel(v) if isinstance(v, Path) else v
)
def test_every_relative_link_points_to_a_file_and_anchor(doc: Path, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    path = (doc.parent / file_part).resolve() if file_part else doc
    assert path.exists(), f"{rel(doc)}: link to {target}: no {file_part}"
    assert REPO in path.parents or path == REPO, f"{rel(doc)}: link to {target} leaves the repository"
    if anchor:
        assert path.suffix == ".md", f"{rel(doc)}: anchor in a link to a non-Markdown file: {target}"
        assert anchor in anchors(path), (
            f"{rel(doc)}: link to {target}: no heading with that anchor in {rel(path)}"
            f" (anchors: {', '.join(sorted(anchors(path)))})"
        )


# --- examples ------------------------------------------------------------------------------------------------


def yaml_examples(prefix: str) -> list[tuple[str, str]]:
    """(where, text) of every yaml block of the docs that starts with ``prefix``."""
    return [
        (f"{rel(doc)} #{n}", body)
        for doc in DOCS
        for n, (lang, body) in enumerate(fenced_blocks(doc.read_text(encoding="utf-8")))
        if lang == "yaml" and body.startswith(prefix)
    ]


MINIMAL_CONFIG = """\
gateway_id: gw-01
store: {id: hk-001, name: Docs example, timezone: Asia/Hong_Kong}
hq: {host: hq.example}
api: {token: {env: GATEWAY_API_TOKEN}}
"""


@pytest.mark.parametrize(
    ("where", "snippet"), yaml_examples("drivers:"), ids=lambda v: v if "\n" not in v else ""
)
def test_config_examples_are_valid(where: str, snippet: str, tmp_path: Path) -> None:
    """A ``drivers:`` example, in a minimal config, passes ``check-config --no-secrets``."""
    config = tmp_path / "store.yaml"
    config.write_text(MINIMAL_CONFIG + snippet, encoding="utf-8")
    code, text = check_config(config, no_secrets=True, env={})
    assert code == 0, f"{where}:\n{text}"


def test_there_are_config_examples() -> None:
    assert len(yaml_examples("drivers:")) >= 5


@pytest.mark.parametrize(
    ("where", "text"), yaml_examples("profile:"), ids=lambda v: v if "\n" not in v else ""
)
def test_profile_examples_are_valid(where: str, text: str) -> None:
    data = YAML(typ="safe", pure=True).load(text)
    assert data["family"] == "modbus", f"{where}: only Modbus examples are checked here"
    ModbusProfile.model_validate(data)


@pytest.mark.parametrize(
    ("where", "text"), yaml_examples("scenario:"), ids=lambda v: v if "\n" not in v else ""
)
def test_scenario_examples_load(where: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / "example.yaml"
    path.write_text(text, encoding="utf-8")
    load_scenario(str(path))


def test_there_are_profile_and_scenario_examples() -> None:
    assert yaml_examples("profile:")
    assert yaml_examples("scenario:")


# --- no development history ----------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_user_docs_carry_no_development_history(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8").lower()
    for phrase in ("issue #", "reviewer"):
        assert phrase not in text, (
            f"{rel(doc)} mentions {phrase!r}: development history belongs in git, not docs"
        )


def test_the_outbox_class_table_lists_every_kind_in_its_default_class() -> None:
    from gateway.kernel.outbox import CLASSES, DEFAULT_KIND_CLASSES

    table: dict[str, int] = {}
    for line in (REPO / "docs" / "OUTBOX.md").read_text().splitlines():
        row = re.match(r"\| (\d) \| `(\w+)` \| (.+?) \|", line)
        if row and CLASSES[int(row[1])] == row[2]:
            table |= dict.fromkeys(re.findall(r"`([a-z_.]+)`", row[3]), int(row[1]))
    assert table == dict(DEFAULT_KIND_CLASSES)
