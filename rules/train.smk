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
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/train/{key}.log",
    threads: stage_threads("train")
    resources:
        mem_mb=resource("train", "mem_mb", 8000),
        runtime=resource("train", "runtime", 60),
        gpu=slurm("train", "gpu"),
        nodes=slurm("train", "nodes"),
        cpus_per_gpu=slurm("train", "cpus_per_gpu"),
        cpus_per_task=slurm("train", "cpus_per_task"),
        tasks=slurm("train", "tasks"),
        mpi=slurm("train", "mpi"),
        slurm_extra=slurm("train", "slurm_extra"),
    shell:
        "OMP_NUM_THREADS={threads} dflash launch train {wildcards.key} > {log} 2>&1"
