from dflash.data.references import TABLE as REFERENCES_TABLE


rule report:
    """Tables, figures and report.md of one phase, from the raw bench records and training metrics."""
    input:
        report_inputs,
        references=str(REFERENCES_TABLE),
    output:
        **report_outputs(),
        provenance="results/reports/{phase}/provenance.json",
    params:
        key=report_key,
    resources:
        **job_resources("report"),
    conda:
        "../workflow/envs/dflash.yaml"
    log:
        "results/logs/report/{phase}.log",
    shell:
        "dflash report {wildcards.phase:q} > {log} 2>&1"


for _phase in PHASES:

    rule:
        name:
            _phase.removeprefix(REHEARSAL)
        input:
            phase_report(_phase),
        default_target: _phase.removeprefix(REHEARSAL) == "smoke"
        localrule: True
