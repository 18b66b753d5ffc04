"""kvcomp's accuracy harness: attention fidelity, decode-faithful NLL, synthetic tasks, reports.

    kvcomp.eval.selection   block selection of many decode positions at once (kvcomp's ops)
    kvcomp.eval.window      the ``kvcomp_eval`` attention function: a window of decode steps
    kvcomp.eval.fidelity    captured attention mass / output error per layer vs the oracle
    kvcomp.eval.nll         teacher-forced NLL with per-position decode selection
    kvcomp.eval.tasks       RULER-style needle / multi-key / multi-value / variable tracking
    kvcomp.eval.report      markdown tables and matplotlib plots
    kvcomp.eval.loading     model and text specs of the CLI
"""
