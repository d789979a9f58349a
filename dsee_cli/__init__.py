"""dsee-cli: DSEE (sparse + low-rank tuning, pruning from |ΔW|, recovery) and its peers on Hugging
Face models. The package map is in the README ("Module map"); the command line is cli.py."""
