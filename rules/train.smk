rule train:
    """DFlash drafter training on the target's hidden states; resumes from results/checkpoints/.

    `dflash launch` runs the stage as its resources ask: directly, under torchrun (one process per GPU), across
    nodes with srun + torchrun, or in a Ray cluster started inside the allocation."""
    input:
        upstream("train"),
    output:
        "results/train/{key}/provenance.json",
    params:
        spec=spec("train"),
        phase=job_phase("train"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/train/{key}.log",
    threads: stage_threads("train")
    resources:
        **job_resources("train"),
    shell:
        "OMP_NUM_THREADS={threads} dflash launch train {wildcards.key} --phase {params.phase:q} > {log} 2>&1"
