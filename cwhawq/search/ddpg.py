"""A DDPG agent (deterministic actor, Q critic) for layer-by-layer bit-ratio decisions, HAQ-style.

- Actor: state -> hidden -> hidden -> action (sigmoid, in [0, 1]^A); critic: (state, action) ->
  hidden -> hidden -> Q. ReLU hidden layers; the last layers start small (+-3e-3), the actor's output
  bias at logit(init_action): the untrained actor asks for high bits everywhere (0.95: 95 % of the
  channels above the lowest level, 95 % of those at the top), so that its first plans are those of
  the Omega-ordered budget enforcement, and learning moves away from there. The critic starts near 0.
- Target networks, soft updates theta' <- tau theta + (1 - tau) theta' after every update.
- Replay buffer of transitions (s, a, r, s', done), uniform sampling.
- Exploration: ``warmup`` episodes of uniform random actions (no updates); afterwards the actor's
  action plus truncated-normal noise on [0, 1] (sampled exactly, by inverse CDF) with
  sigma_e = max(sigma_min, sigma * sigma_decay ** (e - warmup)). With ``greedy_every`` N > 0, the
  first episode after warm-up and every N-th one after it take the actor's action without noise
  (their plans are candidates too; their transitions are stored like the others).
- Every step of an episode gets the episode's reward; a moving-average baseline b (after each
  episode b <- b + baseline_alpha * (R - b), started at the first reward) is subtracted when the
  critic is trained: target y = (r - b) + discount * (1 - done) * Q'(s', mu'(s')).
- All randomness (warm-up actions, noise, replay sampling) comes from one numpy Generator and the
  initial weights from a seeded torch generator; :meth:`DDPG.state_dict` holds everything (networks,
  targets, optimizers, buffer, generator state, baseline), so a resumed search continues exactly.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.special import ndtr, ndtri


@dataclass
class DDPGConfig:
    hidden: int = 300            # units per hidden layer (actor and critic)
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.01            # soft target update rate
    discount: float = 1.0        # HAQ uses 1.0 with the episode reward on every step
    batch_size: int = 64
    buffer_size: int = 20000     # transitions (layers x episodes)
    warmup: int = 20             # episodes of random actions before learning
    sigma: float = 0.3           # initial exploration noise (std of the truncated normal)
    sigma_decay: float = 0.985   # per episode after warm-up
    init_action: float = 0.95    # the untrained actor's output (high bits: the budget enforcement decides)
    sigma_min: float = 0.0
    baseline_alpha: float = 0.1  # moving-average reward baseline rate
    updates_per_step: int = 1    # gradient updates per layer step (after warm-up)
    greedy_every: int = 0        # >0: the first episode after warm-up and every N-th after it act without noise

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, n_out))
    nn.init.uniform_(net[-1].weight, -3e-3, 3e-3)
    nn.init.uniform_(net[-1].bias, -3e-3, 3e-3)
    return net


class Actor(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int, init_action: float = 0.5):
        super().__init__()
        self.net = _mlp(state_dim, hidden, action_dim)
        p = min(max(float(init_action), 1e-3), 1 - 1e-3)
        with torch.no_grad():
            self.net[-1].bias.add_(math.log(p / (1 - p)))

    def forward(self, s):
        return torch.sigmoid(self.net(s))


class Critic(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.net = _mlp(state_dim + action_dim, hidden, 1)

    def forward(self, s, a):
        return self.net(torch.cat([s, a], dim=1))


class ReplayBuffer:
    """Fixed-capacity ring buffer of transitions (float32 numpy arrays)."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int):
        self.capacity = int(capacity)
        self.s = np.zeros((self.capacity, state_dim), np.float32)
        self.a = np.zeros((self.capacity, action_dim), np.float32)
        self.r = np.zeros(self.capacity, np.float32)
        self.s2 = np.zeros((self.capacity, state_dim), np.float32)
        self.done = np.zeros(self.capacity, np.float32)
        self.pos = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, s, a, r, s2, done) -> None:
        i = self.pos
        self.s[i], self.a[i], self.r[i], self.s2[i], self.done[i] = s, a, r, s2, float(done)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int):
        idx = rng.integers(0, self.size, size=n)
        return self.s[idx], self.a[idx], self.r[idx], self.s2[idx], self.done[idx]

    def state_dict(self) -> dict:
        n = self.size   # storage order and write position: restored exactly
        return {"capacity": self.capacity, "pos": self.pos, "size": n,
                **{k: torch.from_numpy(getattr(self, k)[:n].copy()) for k in ("s", "a", "r", "s2", "done")}}

    def load_state_dict(self, d: dict) -> None:
        n = int(d["size"])
        if int(d["capacity"]) != self.capacity:
            raise ValueError("replay buffer capacity differs from the checkpoint's")
        for k in ("s", "a", "r", "s2", "done"):
            getattr(self, k)[:n] = d[k].numpy()
        self.pos, self.size = int(d["pos"]), n


def truncated_normal(rng: np.random.Generator, mu, sigma: float, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Samples of N(mu, sigma) truncated to [lo, hi] (inverse CDF; exact, one uniform per entry)."""
    mu = np.asarray(mu, dtype=np.float64)
    if sigma <= 0:
        return np.clip(mu, lo, hi)
    a, b = ndtr((lo - mu) / sigma), ndtr((hi - mu) / sigma)
    u = rng.uniform(size=mu.shape)
    p = np.clip(a + u * (b - a), 1e-300, 1 - 1e-16)
    return np.clip(mu + sigma * ndtri(p), lo, hi)


class DDPG:
    def __init__(self, state_dim: int, action_dim: int, config: DDPGConfig | None = None, seed: int = 0):
        self.cfg = config or DDPGConfig()
        self.state_dim, self.action_dim = state_dim, action_dim
        c = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(state_dim, action_dim, c.hidden, c.init_action)
            self.critic = Critic(state_dim, action_dim, c.hidden)
        self.actor_t = Actor(state_dim, action_dim, c.hidden)
        self.critic_t = Critic(state_dim, action_dim, c.hidden)
        self.actor_t.load_state_dict(self.actor.state_dict())
        self.critic_t.load_state_dict(self.critic.state_dict())
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=c.lr_actor)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=c.lr_critic)
        self.buffer = ReplayBuffer(c.buffer_size, state_dim, action_dim)
        self.rng = np.random.default_rng(seed)
        self.baseline: float | None = None
        self.updates = 0
        self.last_losses = (float("nan"), float("nan"))

    # ------------------------------------------------------------------------------ acting
    def sigma(self, episode: int) -> float:
        c = self.cfg
        if episode < c.warmup:
            return float("nan")
        if self.greedy(episode):
            return 0.0
        return max(c.sigma_min, c.sigma * c.sigma_decay ** (episode - c.warmup))

    def greedy(self, episode: int) -> bool:
        """Whether this episode acts without exploration noise."""
        c = self.cfg
        return c.greedy_every > 0 and episode >= c.warmup and (episode - c.warmup) % c.greedy_every == 0

    @torch.no_grad()
    def policy(self, state) -> np.ndarray:
        s = torch.as_tensor(np.asarray(state, np.float32)).view(1, -1)
        return self.actor(s)[0].double().numpy()

    def act(self, state, episode: int, explore: bool = True) -> np.ndarray:
        """Warm-up: uniform random; then the actor's action with truncated-normal noise (if ``explore``)."""
        if explore and episode < self.cfg.warmup:
            return self.rng.uniform(size=self.action_dim)
        mu = self.policy(state)
        return truncated_normal(self.rng, mu, self.sigma(episode)) if explore else mu

    # ------------------------------------------------------------------------------ learning
    def observe(self, s, a, r, s2, done) -> None:
        self.buffer.add(s, a, r, s2, done)

    def update_baseline(self, reward: float) -> None:
        if self.baseline is None:
            self.baseline = float(reward)
        else:
            self.baseline += self.cfg.baseline_alpha * (float(reward) - self.baseline)

    def update(self) -> tuple[float, float] | None:
        c = self.cfg
        if len(self.buffer) < min(c.batch_size, self.buffer.capacity):
            return None
        s, a, r, s2, done = (torch.from_numpy(v) for v in self.buffer.sample(self.rng, c.batch_size))
        r = r - (self.baseline or 0.0)
        with torch.no_grad():
            q_next = self.critic_t(s2, self.actor_t(s2)).squeeze(1)
            y = r + c.discount * (1.0 - done) * q_next
        q = self.critic(s, a).squeeze(1)
        loss_c = F.mse_loss(q, y)
        self.opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        self.opt_c.step()
        loss_a = -self.critic(s, self.actor(s)).mean()
        self.opt_a.zero_grad(set_to_none=True)
        loss_a.backward()
        self.opt_a.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_t), (self.critic, self.critic_t)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(1.0 - c.tau).add_(p, alpha=c.tau)
        self.updates += 1
        self.last_losses = (loss_c.item(), loss_a.item())
        return self.last_losses

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """A snapshot (copies, not views of the live tensors) of everything the agent's future depends on."""
        nets = copy.deepcopy({"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                              "actor_t": self.actor_t.state_dict(), "critic_t": self.critic_t.state_dict(),
                              "opt_a": self.opt_a.state_dict(), "opt_c": self.opt_c.state_dict()})
        return {"config": self.cfg.to_dict(), "dims": [self.state_dim, self.action_dim], **nets,
                "buffer": self.buffer.state_dict(), "rng": self.rng.bit_generator.state,
                "baseline": self.baseline, "updates": self.updates}

    def load_state_dict(self, d: dict) -> None:
        if list(d["dims"]) != [self.state_dim, self.action_dim]:
            raise ValueError(f"agent dimensions {d['dims']} differ from {[self.state_dim, self.action_dim]}")
        for name in ("actor", "critic", "actor_t", "critic_t", "opt_a", "opt_c"):
            getattr(self, name).load_state_dict(d[name])
        self.buffer.load_state_dict(d["buffer"])
        self.rng.bit_generator.state = d["rng"]
        self.baseline = d["baseline"]
        self.updates = int(d["updates"])

