"""What a person reads of a finished run: the HTML report, base vs fine-tuned re-evaluation, fetching a stored run."""
