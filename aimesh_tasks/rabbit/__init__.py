"""RabbitMQ as the broker: queue types, the dead-letter exchange, publisher confirms.

| module          | job                                                                  |
|-----------------|----------------------------------------------------------------------|
| `queues`        | the arguments every task queue is declared with (pure)               |
| `amqp`          | Celery's queue table, giving each queue those arguments              |
| `drain`         | a worker consumer step moving RabbitMQ's dead letters into the store |
|                 | `aimesh dead` reads (delivery/dead_letters.py)                       |

Results, live figures and dedup stay on Redis whatever the broker.
"""
