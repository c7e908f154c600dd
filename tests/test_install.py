"""The project's top-level packages must not share an import name with another installed distribution.

transformers 5.25 started to depend on Hugging Face's `kernels` package, and our own `kernels/` (now
`mixer_kernels/`) shadowed it: `import transformers` failed inside its hub-kernels integration. This
catches the next such collision at install time rather than as an ImportError deep in a test.
"""

import importlib.metadata


def test_no_installed_distribution_claims_our_top_level_packages():
    owners = importlib.metadata.packages_distributions()
    ours = sorted(name for name, dists in owners.items() if "hybrid-pretrain" in dists)
    assert {"train", "models", "mixer_kernels", "data", "eval", "launch"} <= set(ours), ours
    clashes = {name: sorted(set(owners[name]) - {"hybrid-pretrain"}) for name in ours}
    assert not any(clashes.values()), f"installed distributions that also provide our packages: {clashes}"
