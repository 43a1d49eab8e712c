rule target:
    """The target model: built and pretrained in-process (synthetic) or recorded from a local path / hub id."""
    input:
        upstream("target"),
    output:
        "results/target/{key}/provenance.json",
    params:
        spec=spec("target"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/target/{key}.log",
    threads: stage_threads("target")
    resources:
        **job_resources("target"),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage target {wildcards.key} > {log} 2>&1"
