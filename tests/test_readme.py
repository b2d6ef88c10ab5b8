"""The README stays true: every setting is documented, and the layout names modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [name for name in Settings.model_fields if f"`AESERVE_{name.upper()}`" not in README]
    assert not missing, f"README lacks AESERVE_ rows for {missing}"


def test_no_documented_setting_is_gone() -> None:
    documented = set(re.findall(r"`AESERVE_([A-Z0-9_]+)`", README))
    known = {name.upper() for name in Settings.model_fields}
    assert documented <= known, f"README documents settings that do not exist: {sorted(documented - known)}"


def test_layout_names_existing_modules() -> None:
    layout = README[README.index("### Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    checked = 0
    for package, names in re.findall(r"^(\w+/(?:\w+/)?)\s+(.+?)(?=^\S|\Z)", layout, flags=re.M | re.S):
        for module in re.findall(r"\b([a-z_]+\.py)\b", names):
            assert list((ROOT / package).rglob(module)), f"README layout names {package}{module}, which does not exist"
            checked += 1
    assert checked >= 40, f"the layout block lists only {checked} modules: was it reformatted?"
