"""The message path as plain functions (the Celery tasks are thin shells over these)."""
