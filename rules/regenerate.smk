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
    threads: stage_threads("regenerate")
    resources:
        **job_resources("regenerate"),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage regenerate {wildcards.key} > {log} 2>&1"
