"""dsee-cli: DSEE (sparse + low-rank tuning, pruning from |ΔW|, recovery) and its peers on Hugging
Face models. The package map is in the README ("Module map"); the command line is cli.py."""

# What the stored steps (phase I, IMP rounds) and the Ω cache were computed with. Bump RESULTS
# with any change that alters what a step computes (not only what its stored state means), so
# that no run reuses numbers an older version of the code produced. 2: segment ids, per-method
# learning rates, tiny models at std 0.1, PST's per-step mask, random Ω per seed. 3: the LM loss
# summed over chunks of target positions; the random pruning criterion drawn per matrix. 4: calibration
# without a KV cache, padding left out, adapted layers masked block by block; DoRA's norm under a mask;
# AdaLoRA's ranks kept in recovery; steps keyed by the device type and the resolved precision.
RESULTS = 4


def results_version() -> str:
    """This package's version and its RESULTS number, e.g. ``0.1.0+results.2``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("dsee-cli")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package = "0+unknown"
    return f"{package}+results.{RESULTS}"
