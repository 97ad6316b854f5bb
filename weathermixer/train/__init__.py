"""Training: the job schema (config.py), checks before any process talks (job.py), the loop in
named phases (trainer.py), the loss, layout-free checkpoints, run logs, and the CLI (main.py,
`python -m weathermixer.train`)."""
