"""The README's test command is the one CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"# --- the README's test command, verbatim ---\n(.+?)\n# --- end ---", ci, re.S)
    assert block, ".ci/run lost its marked test command"
    cmd = block.group(1).strip()
    assert cmd in (ROOT / "README.md").read_text(), "README.md does not show the command .ci/run runs"
