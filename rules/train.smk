rule train:
    """DFlash drafter training on the target's hidden states; resumes from results/checkpoints/."""
    input:
        upstream("train"),
    output:
        "results/train/{key}/provenance.json",
    params:
        spec=spec("train"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/train/{key}.log",
    threads: 2
    resources:
        mem_mb=resource("train", "mem_mb", 8000),
        runtime=resource("train", "runtime", 60),
        gpu=resource("train", "gpus", 0),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage train {wildcards.key} > {log} 2>&1"
