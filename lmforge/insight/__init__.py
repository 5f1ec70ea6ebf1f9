"""Pictures of models and runs: attention maps, the logit lens, training plots, run reports and
model cards. Everything here reads a model folder or a run folder; nothing here trains."""
