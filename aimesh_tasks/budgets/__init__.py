"""Per-agent budgets: reserve before dispatch, settle after the call, reap what died."""

from aimesh_tasks.budgets.admin import BudgetView, get_budget, list_budgets, set_budget
from aimesh_tasks.budgets.estimate import Estimate, worst_case
from aimesh_tasks.budgets.ledger import claim, release, reserve, settle
from aimesh_tasks.budgets.reaper import reap

__all__ = [
    "BudgetView",
    "Estimate",
    "claim",
    "get_budget",
    "list_budgets",
    "reap",
    "release",
    "reserve",
    "set_budget",
    "settle",
    "worst_case",
]
