rule prepare:
    """Training conversations from the configured sources, normalised; benchmark prompts removed."""
    input:
        upstream("prepare"),
    output:
        "results/prepare/{key}/provenance.json",
    params:
        spec=spec("prepare"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/prepare/{key}.log",
    threads: 1
    resources:
        mem_mb=resource("prepare", "mem_mb", 8000),
        runtime=resource("prepare", "runtime", 60),
        gpu=resource("prepare", "gpus", 0),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage prepare {wildcards.key} > {log} 2>&1"
