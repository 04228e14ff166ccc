"""Running on a Ray cluster: the Job Submission client, KubeRay manifests, and what a job uploads."""
