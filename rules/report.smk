from dflash.data.references import TABLE as REFERENCES_TABLE


rule report:
    """Tables, figures and report.md of one phase, from the raw bench records and training metrics."""
    input:
        report_inputs,
        references=str(REFERENCES_TABLE),
    output:
        md=report(
            "results/reports/{phase}/report.md", caption="../workflow/report/report.rst", category="Report"
        ),
        tau=report(
            "results/reports/{phase}/tables/tau.csv", caption="../workflow/report/tau.rst", category="Tables"
        ),
        speedup=report(
            "results/reports/{phase}/tables/speedup.csv",
            caption="../workflow/report/speedup.rst",
            category="Tables",
        ),
        training=report(
            "results/reports/{phase}/tables/training.csv",
            caption="../workflow/report/training.rst",
            category="Tables",
        ),
        deltas=report(
            "results/reports/{phase}/tables/deltas.csv",
            caption="../workflow/report/deltas.rst",
            category="Tables",
            subcategory="References",
        ),
        references=report(
            "results/reports/{phase}/tables/references.csv",
            caption="../workflow/report/references.rst",
            category="Tables",
            subcategory="References",
        ),
        loss=report(
            "results/reports/{phase}/figures/loss.png", caption="../workflow/report/loss.rst", category="Figures"
        ),
        tau_fig=report(
            "results/reports/{phase}/figures/tau.png", caption="../workflow/report/tau_fig.rst", category="Figures"
        ),
        acceptance=report(
            "results/reports/{phase}/figures/acceptance.png",
            caption="../workflow/report/acceptance.rst",
            category="Figures",
        ),
        tau_references=report(
            "results/reports/{phase}/figures/tau_references.png",
            caption="../workflow/report/tau_references.rst",
            category="Figures",
        ),
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
