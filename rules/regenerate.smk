rule regenerate:
    """The target answers the training prompts (the paper's recipe); resumes by chunk."""
    input:
        upstream("regenerate"),
    output:
        "results/regenerate/{key}/provenance.json",
    params:
        spec=spec("regenerate"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/regenerate/{key}.log",
    threads: 2
    resources:
        mem_mb=resource("regenerate", "mem_mb", 8000),
        runtime=resource("regenerate", "runtime", 60),
        gpu=resource("regenerate", "gpus", 0),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage regenerate {wildcards.key} > {log} 2>&1"
