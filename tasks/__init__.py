"""The contract between producer and workers: specs, task names, thin Celery tasks."""
