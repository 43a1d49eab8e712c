for _engine, _keys, _inputs, _threads, _resources in engine_jobs("bench"):

    rule:
        """Every benchmark dataset of one run (drafter and bench settings) through one spec-decode engine, against
        the baseline stage's target-only records."""
        name:
            f"bench_{_engine}"
        input:
            _inputs,
        output:
            [update(done("bench", k)) for k in _keys],  # kept: a rerun resumes
        params:
            spec=canonical_json([REG.get("bench", k).config for k in _keys]),
            instances=" ".join(_keys),  # values, not loop variables: the shell command is formatted when the job runs
            engine=_engine,
        conda:
            "../workflow/envs/dflash.yaml"
        log:
            f"results/logs/bench/{_engine}.log",
        threads: _threads
        resources:
            **_resources,
        shell:
            "OMP_NUM_THREADS={threads} dflash stage bench {params.instances} --engine {params.engine} > {log} 2>&1"
