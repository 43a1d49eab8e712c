"""The stage rules, made from the stage table (dflash.plan.stages.STAGES): a rule per stage, one job per stage
instance (by key); for a stage with `engine`, a rule per engine (`<stage>_<engine key>`), one job writing every
dataset of that engine. Commands: `stage_commands` (rules/common.smk). What each stage does: its module,
src/dflash/stages/<stage>.py."""

# Snakemake evaluates a rule's shell expression twice: when it defines the rule (the command it prints and records,
# its `code` rerun trigger) and again when the job runs, inside a function whose argument `rule` is the rule's name.
# The loops below therefore call their variable `rule` (the rule's name) and look the command up by it: both
# evaluations give the same command (a loop variable of another name would hold its last value when a job runs).
COMMANDS = stage_commands()


for rule, _stage in ((s.name, s) for s in STAGES if not s.engine):

    rule:
        """One instance of a stage of the stage table, by key."""
        name:
            rule
        input:
            upstream(rule),
        output:
            f"results/{rule}/{{key}}/provenance.json",
        params:
            spec=stage_config(rule),
            **({"phase": job_phase(rule)} if _stage.launch else {}),
        conda:
            "../workflow/envs/dflash.yaml"
        log:
            f"results/logs/{rule}/{{key}}.log",
        threads: stage_threads(rule)
        resources:
            **job_resources(rule),
        shell:
            COMMANDS[rule]


for _stage in (s for s in STAGES if s.engine):
    for rule, _engine, _keys, _inputs, _threads, _resources in engine_jobs(_stage.name):

        rule:
            """The datasets of one engine of a stage (bench: one run's drafter and bench settings, against the
            baseline stage's records; baseline: one target and its decoding settings), one engine start."""
            name:
                rule
            input:
                _inputs,
            output:
                [update(done(_stage.name, k)) for k in _keys],  # kept: a rerun resumes
            params:
                spec=canonical_json([REG.get(_stage.name, k).config for k in _keys]),
                instances=" ".join(_keys),
                engine=_engine,
            conda:
                "../workflow/envs/dflash.yaml"
            log:
                f"results/logs/{_stage.name}/{_engine}.log",
            threads: _threads
            resources:
                **_resources,
            shell:
                COMMANDS[rule]
