"""Governance: the agent registry and the audit trail (ACLs, intents, rate limits later)."""

from aimesh_tasks.governance.agents import Agent, add_agent, get_agent, list_agents

__all__ = ["Agent", "add_agent", "get_agent", "list_agents"]
