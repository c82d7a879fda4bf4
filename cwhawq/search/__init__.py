"""CW-HAWQ search: a DDPG agent chooses, per layer, the ratios of channels at each bit-width; the
channels take their bits in Hessian-trace order (docs/search.md).

Modules: :mod:`.env` (states, action mapping, exact budget enforcement), :mod:`.costs` (budget
metrics, the latency hook), :mod:`.reward` (plan -> reward on the validation subset), :mod:`.ddpg`
(the agent), :mod:`.runner` (episodes, log, checkpoints, resume).
"""
from .costs import BudgetError, CostModel, make_cost_model
from .ddpg import DDPG, DDPGConfig
from .env import ENFORCE_MODES, QuantSearchEnv, SensitivityError, register_enforce_mode, stick_action, stick_ratios
from .reward import REWARDS, PlanEvaluator, register_reward
from .runner import SearchConfig, SearchError, search

__all__ = ["search", "SearchConfig", "SearchError", "BudgetError", "SensitivityError", "CostModel", "make_cost_model",
           "DDPG", "DDPGConfig", "QuantSearchEnv", "PlanEvaluator", "stick_ratios", "stick_action", "ENFORCE_MODES",
           "register_enforce_mode", "REWARDS", "register_reward"]
