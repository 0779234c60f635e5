"""`tuneforge methods` lists every registered adapter method with its PEFT type."""

from __future__ import annotations

from tuneforge.adapters import list_methods
from tuneforge.cli import main


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    shown = capsys.readouterr().out
    for spec in list_methods():
        assert spec.name in shown, f"{spec.name} missing from `tuneforge methods`"
    assert "LORA" in shown
