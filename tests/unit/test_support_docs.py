"""The runbook and the CLI docs stay true to the command line: every alert section says which
command to run first, and every ``orders-export exports`` command they show parses."""

from __future__ import annotations

import argparse
import re
import shlex
import uuid
from pathlib import Path

import pytest
import yaml

from shared.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "runbook.md", ROOT / "docs" / "cli.md", ROOT / "README.md"]
#: What the placeholders of the docs stand for in a real command.
PLACEHOLDERS = {
    "ID": str(uuid.UUID(int=1)),
    "SLUG": "acme",
    "NAME": "oncall",
    "DURATION": "1h",
    "N": "5",
    "STATE": "failed",
}


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def commands() -> list[str]:
    found = []
    for path in DOCS:
        for line in re.findall(r"orders-export exports [^`\n#]*", path.read_text()):
            if "[" not in line and "|" not in line and "..." not in line:
                found.append(line.strip())
    return found


def test_every_alert_section_says_which_command_to_run_first() -> None:
    rules = yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text())
    alerts = [r["alert"] for group in rules["groups"] for r in group["rules"]]
    runbook = sections((ROOT / "docs" / "runbook.md").read_text())
    for alert in alerts:
        first = re.search(r"\*\*Run first\*\*: `(orders-export [^`]+)`", runbook[alert])
        assert first, f"{alert} names no command to run first"


def test_sql_is_only_in_the_appendix() -> None:
    for title, body in sections((ROOT / "docs" / "runbook.md").read_text()).items():
        if not title.startswith("Appendix"):
            assert "SELECT " not in body and "```sql" not in body, title


@pytest.mark.parametrize("command", commands())
def test_documented_commands_parse(command: str) -> None:
    words = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)]
    args = build_parser().parse_args(words[1:])
    assert args.command == "exports" and callable(args.handler)


def parser_commands() -> dict[str, set[str]]:
    """Every command of the parser (``"tokens create"``) and its long options."""
    found: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
            found[path] = options - {"--help"}
            return
        for name, sub in subparsers[0].choices.items():
            walk(sub, f"{path} {name}".strip())

    walk(build_parser(), "")
    return found


def documented_commands(path: Path, heading: str) -> dict[str, set[str]]:
    """The commands of the code block under ``heading`` in ``path``, with the options shown."""
    block = re.search(rf"^## {heading}\n+```\n(.*?)```", path.read_text(), flags=re.M | re.S)
    assert block, f"{path.name} has no command block under '## {heading}'"
    known = parser_commands()
    found: dict[str, set[str]] = {}
    for line in block.group(1).splitlines():
        words = line.split()[1:]
        name = next((" ".join(words[:n]) for n in (2, 1) if " ".join(words[:n]) in known), line)
        found[name] = set(re.findall(r"--[a-z][a-z-]*", line))
    return found


@pytest.mark.parametrize(
    ("doc", "heading"), [("docs/cli.md", "Commands"), ("README.md", "Command line")]
)
def test_the_command_lists_show_every_command_and_option_the_parser_has(
    doc: str, heading: str
) -> None:
    assert documented_commands(ROOT / doc, heading) == parser_commands()
