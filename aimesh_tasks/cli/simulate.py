"""`aimesh simulate`: run the simulated LLM provider server."""

from __future__ import annotations

import typer

from aimesh_tasks.simulator import SimulatorConfig, run_simulator


def simulate(
    port: int = typer.Option(8000, "--port", help="Port on 127.0.0.1."),
    host: str = typer.Option("127.0.0.1", "--host"),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="Latency of every answer."),
    jitter_ms: float = typer.Option(0.0, "--jitter-ms", help="Uniform extra latency, up to."),
    error_rate: float = typer.Option(0.0, "--error-rate", help="Fraction answered 500."),
    throttle_rate: float = typer.Option(0.0, "--throttle-rate", help="Fraction answered 429."),
    completion_tokens: int = typer.Option(16, "--completion-tokens"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Serve OpenAI-compatible chat completions with configurable latency and errors."""
    try:
        config = SimulatorConfig(
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            error_rate=error_rate,
            throttle_rate=throttle_rate,
            completion_tokens=completion_tokens,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run_simulator(config, host=host, port=port)
