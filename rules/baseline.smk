for _engine, _keys, _inputs, _threads, _resources in engine_jobs("baseline"):

    rule:
        """The target-only decode of every dataset of one engine (target, decoding settings), one engine start."""
        name:
            f"baseline_{_engine}"
        input:
            _inputs,
        output:
            [update(done("baseline", k)) for k in _keys],  # kept: a rerun resumes
        params:
            spec=canonical_json([REG.get("baseline", k).config for k in _keys]),
            instances=" ".join(_keys),  # values, not loop variables: the shell command is formatted when the job runs
            engine=_engine,
        conda:
            "../workflow/envs/dflash.yaml"
        log:
            f"results/logs/baseline/{_engine}.log",
        threads: _threads
        resources:
            **_resources,
        shell:
            "OMP_NUM_THREADS={threads} dflash stage baseline {params.instances} --engine {params.engine} > {log} 2>&1"
