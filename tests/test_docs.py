"""The README documents what the code does: every train.py flag, and the two quick-start commands exist."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_flag_tables_are_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("flag_table", REPO / "scripts" / "flag_table.py")
    flag_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flag_table)
    readme = (REPO / "README.md").read_text()
    assert flag_table.readme_with_tables(readme) == readme, (
        "README.md's train.py flag tables are out of date: run `python scripts/flag_table.py --write`"
    )


def test_quick_start_scripts_exist():
    readme = (REPO / "README.md").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in readme
    assert (REPO / "scripts" / "test.sh").exists() and (REPO / "scripts" / "demo.sh").exists()
