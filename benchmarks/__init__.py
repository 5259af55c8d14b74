"""Benchmarks of ocd_hf: the paper's tables on offline stand-ins, speed, and smaller measurements.

Run the scripts as modules from the project root (`make bench` does):

    python -m benchmarks.paper_tables     # the paper's tables, 4 tasks x 3 seeds -> docs/results/paper_tables.*
    python -m benchmarks.speed            # speed, measured side by side -> docs/results/speed.*
    python -m benchmarks.render_results   # docs/results.md from those fragments

Modules: `models` (the base models), `data` (offline data and splits), `tasks` (task builders: data,
a trained base model and the OCD settings per task), `run` (one (task, seed) run of every head and
variant), `stats` (per-seed statistics and verdicts), `tables` (Markdown and result files).
"""
