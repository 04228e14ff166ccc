"""File names inside a run folder (shared by the loop that writes them and the commands that read them)."""

RUN_SPEC = "run.yaml"  # the resolved job spec the run used
METRICS = "metrics.jsonl"  # one JSON object per log / evaluation step
SUMMARY = "summary.json"  # written last: its presence means the run finished
EVAL_BEFORE = "eval_before.json"
EVAL_AFTER = "eval_after.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"  # adapter/ or model/, tokenizer/, labels.json
LABELS = "labels.json"  # class names of a classification run, in head order
