"""Observability: Prometheus metrics defined once, JSON logs with redaction, exporters.

| module          | job                                                              |
|-----------------|------------------------------------------------------------------|
| metrics.py      | every worker metric, and why multiprocess mode                   |
| record.py       | message-path events -> metric samples                            |
| logging.py      | JSON formatter, redaction, root logger set-up                    |
| decision_log.py | message-path events -> one log event per decision                |
| worker.py       | install(): receivers, Celery logging and the node's /metrics     |
| exporter.py     | cluster exporter: queue depths from the broker, live figures     |
| flower_auth.py  | Flower with basic auth on every page, API and /metrics           |
"""
