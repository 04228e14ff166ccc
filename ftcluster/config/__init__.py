"""The job spec, the registry of methods / objectives / data formats, and the DeepSpeed config they imply."""
