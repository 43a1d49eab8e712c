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
    threads: 2
    resources:
        mem_mb=resource("target", "mem_mb", 8000),
        runtime=resource("target", "runtime", 60),
        gpu=resource("target", "gpus", 0),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage target {wildcards.key} > {log} 2>&1"
