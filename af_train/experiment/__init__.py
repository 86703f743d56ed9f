"""``af-experiment``: repeated runs, folds and ablations of the af_train pipeline, with intervals.

An experiment file (YAML, strict: ``spec``) names a base pipeline (data steps, MLM pretraining per
code row, fine-tuning, an optional second fine-tuning stage), arms (overrides of those stages), seeds
and, for cross-validation, folds. ``plan`` expands it into units (data steps and training runs, each
keyed by a hash of everything it depends on), ``runner`` runs them through the ordinary command-line
tools (``af-train``, ``af-evaluate``) locally or as SLURM job arrays, and ``report`` turns the
runs' per-clip test scores into ``results.json``, ``results.md`` and plots: each arm as mean ± std over
seeds with a bootstrap interval, and paired differences against the baseline arm.

This package talks to the rest of af_train through those commands and their output files; it
imports only the recipe loader (``af_train.config``), the metrics and the file helpers.
"""
