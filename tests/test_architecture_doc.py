"""docs/architecture.md's map of the package names every module, so a new module cannot go unmapped."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_is_in_the_architecture_map():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Where each part lives"):doc.index("## Slot lifecycle")]
    modules = [p for p in (ROOT / "ray_modelbatch").rglob("*.py") if p.name != "__init__.py"]
    assert modules
    missing = [str(p.relative_to(ROOT)) for p in modules if f"{p.stem}.py" not in table]
    assert not missing, f"add these modules to the table in docs/architecture.md: {missing}"
