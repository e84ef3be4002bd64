"""The README's flag table against the options (procs/config.py): every option has its row, in the same
order, with its flags, its variable and its default as ServerConfig says; no row names an option that does not
exist. The `meaning` column is the README's own words (it may say more than `--help`), only checked not empty.
"""

from __future__ import annotations

from pathlib import Path

from procs.config import OPTIONS, Option, describe_default, option_default

README = Path(__file__).resolve().parent.parent / "README.md"
HEADER = "| flag | environment | default | meaning |"


def expected_cells(option: Option) -> tuple[str, str, str]:
    """(flag, environment, default) as the README writes them for `option`."""
    first, *others = option.flags
    flag = f"`{first} {option.metavar}`" if option.metavar else f"`{first}`"
    if others:
        flag += " (" + ", ".join(f"`{other}`" for other in others) + ")"
    env = f"`{option.env}=1`" if option.parse is None else f"`{option.env}`"
    # A value is code (`8998`); words that describe a default (the demo, none, off) are plain text.
    shown = describe_default(option)
    value = option_default(option)
    is_value = option.default_text is None and option.parse is not None and value not in (None, ())
    return flag, env, f"`{shown}`" if is_value else shown


def readme_rows() -> list[tuple[str, str, str, str]]:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(HEADER)
    assert lines[start + 1].startswith("| --- |"), "the table's header separator"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip()[1:-1].split("|")]
        assert len(cells) == 4, f"a row of four cells: {line}"
        rows.append((cells[0], cells[1], cells[2], cells[3]))
    return rows


def test_the_readme_lists_every_option_with_its_variable_and_default() -> None:
    rows = readme_rows()
    written = [row[:3] for row in rows]
    expected = [expected_cells(option) for option in OPTIONS]
    for want in expected:
        assert want in written, f"README.md flag table: no row | {' | '.join(want)} | ..."
    for got in written:
        assert got in expected, f"README.md flag table: | {' | '.join(got)} | is no option of procs/config.py"
    assert written == expected, "README.md flag table: rows in the order of procs/config.py's OPTIONS"
    assert all(row[3] for row in rows), "every row says what its flag means"

