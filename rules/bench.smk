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
    threads: stage_threads("bench")
    resources:
        **job_resources("bench"),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage bench {wildcards.key} > {log} 2>&1"
