"""A simulated LLM provider: a real aiohttp server speaking the OpenAI Chat Completions format.

Deterministic completions and token counts, configurable latency and injected 500/429
failures, and control endpoints (`/_sim/stats`, `/_sim/calls`, `/_sim/in_flight`,
`/_sim/reset`, `/_sim/config`) for tests, the demo and benchmarks.

    with start_simulator(SimulatorConfig(latency_ms=50)) as sim:
        openai.OpenAI(base_url=sim.url + "/v1", api_key="x").chat.completions.create(...)
"""

from aimesh_tasks.simulator.config import SimulatorConfig
from aimesh_tasks.simulator.server import build_app, run_simulator
from aimesh_tasks.simulator.thread import RunningSimulator, start_simulator

__all__ = ["RunningSimulator", "SimulatorConfig", "build_app", "run_simulator", "start_simulator"]
