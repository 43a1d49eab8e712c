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
    threads: stage_threads("prepare")
    resources:
        **job_resources("prepare"),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage prepare {wildcards.key} > {log} 2>&1"
