"""Hyperparameter sweeps: a spec of axes over config keys -> numbered trials -> results.

    spec.py     the YAML spec: base config, grid, lists, random samples, repeats, budget
    plan.py     the numbered, validated trials and the sweep folder (spec.yaml, trials.json)
    run.py      one trial in this process: skipped when done, resumed from its checkpoint
    report.py   report.csv/.md, loss-vs-parameter plots, the best trial's config
    cli.py      `gptrain sweep plan|run|report`
"""
