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
    threads: stage_threads("convert")
    resources:
        **job_resources("convert"),
    shell:
        "OMP_NUM_THREADS={threads} dflash stage convert {wildcards.key} > {log} 2>&1"
