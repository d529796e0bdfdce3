"""docs/config.md is generated from the config dataclasses and must be current; every key has a meaning."""
import dataclasses
from pathlib import Path

from opt_ds.config import RunConfig
from opt_ds.config.reference import reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def test_config_reference_is_current():
    assert DOC.read_text() == reference(), ("docs/config.md is out of date: regenerate it with "
                                            "`python -m opt_ds.config.reference > docs/config.md`")


def keys(value, prefix=""):
    for field in dataclasses.fields(value):
        inner = getattr(value, field.name)
        name = f"{prefix}{field.name}"
        yield from keys(inner, f"{name}.") if dataclasses.is_dataclass(inner) else [name]


def test_every_key_is_documented_with_a_meaning():
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    documented = {row.split("`")[1] for row in rows}
    assert set(keys(RunConfig())) - {"deepspeed"} <= documented and "## `deepspeed`" in reference()
    assert [row for row in rows if row.rstrip().endswith("|  |")] == [], "a key without a meaning in sections.py"
