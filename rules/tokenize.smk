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
    threads: 1
    resources:
        mem_mb=resource("tokenize", "mem_mb", 8000),
        runtime=resource("tokenize", "runtime", 60),
        gpu=resource("tokenize", "gpus", 0),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage tokenize {wildcards.key} > {log} 2>&1"
