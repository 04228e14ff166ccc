"""ftcluster: fine-tune pretrained language models from one YAML job spec."""
__version__ = "0.1.0"
