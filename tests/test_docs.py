"""The docs document what the code does: every train.py flag (docs/flags.md), the two quick-start commands exist
(README.md), and every internal link resolves."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_flag_tables_are_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("flag_table", REPO / "scripts" / "flag_table.py")
    flag_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flag_table)
    flags = (REPO / "docs" / "flags.md").read_text()
    assert flag_table.readme_with_tables(flags) == flags, (
        "docs/flags.md's train.py flag tables are out of date: run `python scripts/flag_table.py --write`"
    )


def test_quick_start_scripts_exist():
    readme = (REPO / "README.md").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in readme
    assert (REPO / "scripts" / "test.sh").exists() and (REPO / "scripts" / "demo.sh").exists()


# ------------------------------------------------------------------------------------------- internal links resolve


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: the rendered text (links and code marks reduced to their text), lower case,
    every character but letters, digits, '_', '-' and spaces dropped, spaces turned into '-'."""
    import re

    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def outside_code(text: str) -> list[str]:
    """The lines of a markdown file outside fenced code blocks, with inline code spans blanked."""
    import re

    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        lines.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return lines


def anchors_of(path: Path) -> set[str]:
    """Every heading id of a markdown file (repeated headings get -1, -2, ... as on GitHub) and explicit ids."""
    import re

    anchors, seen = set(), {}
    raw = path.read_text(encoding="utf-8")
    for line in outside_code(raw):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_anchor(match.group(1))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    anchors.update(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", raw))
    return anchors


def test_every_internal_markdown_link_resolves():
    """README.md and docs/*.md: every relative link names a file that exists and every #anchor a heading of it."""
    import re

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    anchors, broken, checked = {}, [], 0
    for page in pages:
        for number, line in enumerate(outside_code(page.read_text(encoding="utf-8")), 1):
            for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:: not ours to check
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (page.parent / file_part).resolve() if file_part else page
                checked += 1
                if not linked.exists():
                    broken.append(f"{page.relative_to(REPO)}:{number}: {target} (no such file)")
                elif anchor and linked.suffix == ".md":
                    if linked not in anchors:
                        anchors[linked] = anchors_of(linked)
                    if anchor not in anchors[linked]:
                        broken.append(f"{page.relative_to(REPO)}:{number}: {target} (no heading with that anchor)")
    assert checked > 50  # the links were found at all
    assert not broken, "broken internal links:\n" + "\n".join(broken)


def test_github_anchor_rules():
    assert github_anchor("Timestep masking and importance weighting (our interpretation of SDPO)") == \
        "timestep-masking-and-importance-weighting-our-interpretation-of-sdpo"
    assert github_anchor("The pair builder: `python -m eval.make_pairs`") == "the-pair-builder-python--m-evalmake_pairs"
    assert github_anchor("Every train.py flag") == "every-trainpy-flag"
    assert github_anchor("Beyond the official: LoRA, streaming — EMA") == "beyond-the-official-lora-streaming--ema"
