rule bench:
    """One benchmark dataset through the spec-decode engine and the target-only baseline."""
    input:
        upstream("bench"),
    output:
        "results/bench/{key}/provenance.json",
    params:
        spec=spec("bench"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/bench/{key}.log",
    threads: 1
    resources:
        mem_mb=resource("bench", "mem_mb", 8000),
        runtime=resource("bench", "runtime", 60),
        gpu=resource("bench", "gpus", 0),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage bench {wildcards.key} > {log} 2>&1"
