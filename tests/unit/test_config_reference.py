"""docs/config-reference.md is generated from the config model and must match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import model, reference

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"


def test_the_committed_reference_is_what_the_model_generates():
    generated = reference.generate()
    assert COMMITTED.read_text() == generated, (
        "docs/config-reference.md is stale: run `python -m proxy.config.reference > docs/config-reference.md`")


def test_the_module_prints_the_reference():
    done = subprocess.run([sys.executable, "-m", "proxy.config.reference"], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout == reference.generate()


def test_every_model_and_field_is_documented():
    text = reference.generate()
    for cls, _ in reference._walk(reference._models(), reference._Source()):
        assert f"\n## {cls.__name__}\n" in text
        for name, field in cls.model_fields.items():
            assert f"| `{field.alias or name}` |" in text, f"{cls.__name__}.{name}"
    # Every model the file can hold is reached from the top.
    reached = {cls.__name__ for cls, _ in reference._walk(reference._models(), reference._Source())}
    assert reached == set(reference._models()) - {"_Model"}


def test_types_defaults_and_descriptions_come_from_the_model():
    text = reference.generate()
    assert "| `drain_timeout` | duration | `30s` |" in text  # Duration, serialized as a file has it
    assert "| `lb` | `round_robin` \\| `random` \\| `least_request`" in text
    assert "| `max_connections` | integer 1–1000000 | `1024` | Upstream connections open at once. |" in text
    assert "| `listeners` | list of [Listener](#listener) (at least one) | *required* |" in text
    assert "| `from` | list of SPIFFE ID, prefix/* or * (at least one) (optional) |" in text
    assert "At `listeners[].routes[].retry.backoff`." in text
    assert model.Retry.__doc__.split()[1] in text  # docstrings are carried over


def test_a_note_for_a_field_that_is_gone_is_an_error(monkeypatch):
    monkeypatch.setitem(reference.NOTES, "Cluster.no_such_field", "stale")
    with pytest.raises(ValueError, match="Cluster.no_such_field"):
        reference.generate()
