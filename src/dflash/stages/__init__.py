"""The stages' code: the runner (`runner.py`) and one module per stage of the stage table (`dflash.plan.stages`),
each with `run(ctx) -> {"summary": {...}, "inputs": {...}}` (see `runner.Context`)."""
