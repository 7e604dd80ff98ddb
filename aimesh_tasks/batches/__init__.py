"""OpenAI-style batches on the queue: uploaded files, batches and their lines, stored in
the database so that a restart of the ingress that drives them loses nothing.

`input` parses a batch's JSONL (pure); `store` keeps files, batches and lines.
"""
