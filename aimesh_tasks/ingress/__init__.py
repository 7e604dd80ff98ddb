"""The OpenAI-compatible HTTP ingress: a thin shell over `submit()` (see ingress/app.py).

| module          | routes / job                                                      |
|-----------------|-------------------------------------------------------------------|
| chat            | POST /v1/chat/completions (sync, SSE, 202), GET /v1/models        |
| messages        | GET /v1/aimesh/messages/{id}[/events]: state, position, ETA, result|
| batch           | POST /v1/batch (a list in, a list out)                            |
| batches         | OpenAI Files and Batch APIs (/v1/files, /v1/batches)              |
| batch_driver    | queues stored batches' lines and collects their answers           |
| status          | /healthz, /v1/status, /v1/providers, /v1/routes, /v1/agents,      |
|                 | POST /v1/cache/clear                                              |
| metrics         | /metrics (the ingress's own request metrics)                      |
| auth, jwt_auth  | API keys (hashed) and optional JWTs; X-Source-Agent               |
| errors, limits  | OpenAI-shaped errors; body caps (413 before parsing)              |
| service         | the shared submit/await, model hints, header fields               |
"""
