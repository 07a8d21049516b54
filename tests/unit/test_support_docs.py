"""The runbook and the CLI docs stay true to the command line: every alert section says which
command to run first, and every ``orders-export exports`` command they show parses."""

from __future__ import annotations

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
