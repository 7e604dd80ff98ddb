"""The OpenAI-compatible HTTP ingress: a thin shell over `submit()` (see ingress/app.py).

| module         | routes                                                          |
|----------------|-----------------------------------------------------------------|
| chat           | POST /v1/chat/completions (sync, SSE, 202), GET /v1/models      |
| messages       | GET /v1/aimesh/messages/{id} (state, queue position, ETA, result)|
| batch          | POST /v1/batch                                                  |
| status         | /healthz, /v1/status, /v1/providers, /v1/agents                 |
| metrics        | /metrics (the ingress's own request metrics)                    |
| auth, errors,  | API keys, OpenAI-shaped errors, body caps, shared submit/await  |
| limits, service|                                                                 |
"""
