"""Fine-tuning for tasks: labelled data in (tabular.py), a task's examples, batches and scores
(classify.py), and the run that trains them with the shared Trainer (run.py)."""
