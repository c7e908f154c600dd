"""The project's top-level packages must not share an import name with another installed distribution.

transformers 5.25 started to depend on Hugging Face's `kernels` package, and our own `kernels/` (now
`mixer_kernels/`) shadowed it: `import transformers` failed inside its hub-kernels integration. This
catches the next such collision at install time rather than as an ImportError deep in a test.
"""

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_installed_distribution_claims_our_top_level_packages():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ours = [pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert ours and all((ROOT / name / "__init__.py").exists() for name in ours)
    owners = importlib.metadata.packages_distributions()
    clashes = {name: sorted(set(owners[name]) - {"hybrid-pretrain"}) for name in ours if name in owners}
    assert not any(clashes.values()), f"installed distributions that also provide our packages: {clashes}"
