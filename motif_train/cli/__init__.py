"""The command-line entry points (console scripts in pyproject.toml), one module per command:
`motif-train` (train), `motif-plan` (plan), `motif-preprocess` (preprocess), `motif-export`
(export), `motif-sample` (sample), `motif-flops` (flops), `motif-dryrun` (dryrun),
`motif-wandb-workspace` (wandb_workspace). They parse arguments / compose Hydra configs and call
the library: the trainer and its components at the package root, data/, models/, objectives/,
distributed/."""
