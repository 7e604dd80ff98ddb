"""`aimesh agents`: the agent registry."""

from __future__ import annotations

import json

import typer

from aimesh_tasks.cli.shell import stdout, table

cli = typer.Typer(help="Agents: who sends messages (budgets and ACLs refer to them).",
                  no_args_is_help=True)


@cli.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Every registered agent."""
    from aimesh_tasks.governance import agents as registry

    agents = registry.list_agents()
    if as_json:
        for agent in agents:
            typer.echo(json.dumps(agent.to_dict()))
        return
    if not agents:
        typer.echo("no agents registered; add one with `aimesh agents add research-bot`")
        return
    rows = table("id", "description", "enabled", "created")
    for a in agents:
        created = a.created_at.strftime("%Y-%m-%d %H:%M") if a.created_at else "-"
        rows.add_row(a.id, a.description, "yes" if a.enabled else "no", created)
    stdout().print(rows)


@cli.command("add")
def add(
    agent_id: str = typer.Argument(..., help="Id, lowercase kebab or snake case: research-bot."),
    description: str = typer.Option("", "--description", "-d", help="What the agent does."),
    exist_ok: bool = typer.Option(False, "--exist-ok",
                                  help="An agent already registered is fine (exit 0): for "
                                       "scripts that run more than once."),
) -> None:
    """Register an agent."""
    from aimesh_tasks.errors import NotFound
    from aimesh_tasks.governance import agents as registry

    if exist_ok:
        try:
            registry.get_agent(agent_id)
            typer.echo(f"agent {agent_id} is registered already")
            return
        except NotFound:
            pass
    agent = registry.add_agent(agent_id, description)
    typer.echo(f"added agent {agent.id}")


@cli.command("show")
def show(agent_id: str = typer.Argument(..., help="The agent's id.")) -> None:
    """One agent as JSON."""
    from aimesh_tasks.governance import agents as registry

    typer.echo(json.dumps(registry.get_agent(agent_id).to_dict(), indent=2))
