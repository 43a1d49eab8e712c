rule convert:
    """The trained drafter as safetensors + config.json in the z-lab / SGLang draft format."""
    input:
        upstream("convert"),
    output:
        "results/convert/{key}/provenance.json",
    params:
        spec=spec("convert"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/convert/{key}.log",
    threads: 1
    resources:
        mem_mb=resource("convert", "mem_mb", 8000),
        runtime=resource("convert", "runtime", 60),
        gpu=resource("convert", "gpus", 0),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage convert {wildcards.key} > {log} 2>&1"
