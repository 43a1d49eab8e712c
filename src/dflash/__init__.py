"""dflash: a Snakemake harness that trains and benchmarks DFlash drafters. See ARCHITECTURE.md for the layout."""
