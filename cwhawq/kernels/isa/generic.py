"""The portable kernels: any LLVM target (16-lane vectors, one ``k`` at a time). Slow on every
machine that has a dedicated instruction set above; ``cwhawq compile`` warns when it is used."""
from __future__ import annotations

from . import Isa, register
from .common import portable_strategies

register(Isa("generic", "portable vector code (no integer dot-product instructions)", "any", (),
             priority=0, portable=True, vector_bits=128,
             strategies_fn=lambda isa, op: portable_strategies(op, regs=16, vector_bits=128, fp32_mt=4)))
