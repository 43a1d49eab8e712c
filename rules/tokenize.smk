rule tokenize:
    """Chat template, assistant-only loss mask, min_loss_tokens and max_length."""
    input:
        upstream("tokenize"),
    output:
        "results/tokenize/{key}/provenance.json",
    params:
        spec=spec("tokenize"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/tokenize/{key}.log",
    threads: stage_threads("tokenize")
    resources:
        **job_resources("tokenize"),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage tokenize {wildcards.key} > {log} 2>&1"
