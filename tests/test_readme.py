"""The README: CI runs its test command, its Python snippets run on a CPU machine, and it links only files that
exist in the repository."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"# --- the README's test command, verbatim ---\n(.+?)\n# --- end ---", ci, re.S)
    assert block, ".ci/run lost its marked test command"
    cmd = block.group(1).strip()
    assert cmd in README, "README.md does not show the command .ci/run runs"


def test_readme_python_snippets_run_on_cpu():
    """Every ```python block of the README, in order, in one namespace (the integration lines patch and are undone)."""
    blocks = re.findall(r"```python\n(.+?)```", README, re.S)
    assert len(blocks) >= 2
    ns = {}
    try:
        for code in blocks:
            if "integrations.open_clip" in code or "integrations.transformers" in code:
                from _thirdparty import missing, torchvision_shim

                if missing("open_clip", "transformers") is not None:
                    continue
                torchvision_shim()
            exec(compile(code, "README.md", "exec"), ns)
        assert "loss" in ns and bool(ns["loss"].isfinite())
    finally:
        import sys

        if "fastcontrast.integrations.open_clip" in sys.modules:
            sys.modules["fastcontrast.integrations.open_clip"].unpatch()
        if "fastcontrast.integrations.transformers" in sys.modules:
            sys.modules["fastcontrast.integrations.transformers"].revert()


def test_readme_and_docs_link_only_files_in_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).resolve().is_relative_to(ROOT), (doc.name, target)
            assert (doc.parent / target).exists(), (doc.name, target)


def test_readme_counts_its_families():
    assert "Four loss families from three papers, plus SigLIP" in README
    assert "../shared" not in README
