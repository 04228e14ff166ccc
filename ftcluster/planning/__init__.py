"""Before a run: memory, time and cost per setup, and whether the cluster can ever place the job."""
