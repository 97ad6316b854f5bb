"""Training: the job schema (config.py), checks before any process talks (job.py), the loop in
named phases (trainer.py), the loss, checkpoints, run logs, resharding, and the CLI (main.py,
`python -m weathermixer.train`)."""
