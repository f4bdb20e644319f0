"""Forward-looking KV memory for one device, and the per-device action queue.

Each running request reserves ceil((prompt + generated + look-ahead) / block) blocks. An
instance's target size is its reservation x watermark; it grows when the reservation exceeds
what it holds, and shrinks only when the target falls below current / watermark (hysteresis,
no ping-pong). Defaults are the paper's: look-ahead 512 tokens, watermark 1.25.

All loads, unloads and resizes go through one DeviceActions queue. Shrinks and unloads may start
at once; a grow or a load is committed only against memory that has actually been freed (a
completed shrink/unload), never against a shrink still in flight. That is what rules out OOM.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryConfig:
    block_tokens: int = 32
    lookahead_tokens: int = 512
    watermark: float = 1.25
    min_instance_blocks: int = 0  # floor for an active instance (the paper keeps 4096 tokens)

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.lookahead_tokens < 0 or self.watermark < 1.0:
            raise ValueError(f"invalid memory config: {self}")


def reservation_blocks(tokens: int, lookahead_tokens: int, block_tokens: int, cap_tokens: int | None = None) -> int:
    """Blocks one request reserves: its tokens so far plus the look-ahead, never past the
    context limit (cap_tokens) since it cannot grow beyond that."""
    want = tokens + lookahead_tokens
    return math.ceil((want if cap_tokens is None else min(want, cap_tokens)) / block_tokens)


def context_bound(prompt_tokens: int, max_tokens: int | None, context_limit: int) -> int:
    """The most tokens a request can ever hold: prompt + max_tokens, never past the context limit.
    The look-ahead covers output we cannot foresee; past a declared max_tokens there is none, so
    reserving it would only lock KV away from other requests (the trace's outputs average 220
    tokens, under half the 512-token look-ahead)."""
    if max_tokens is None:
        return context_limit
    return min(context_limit, prompt_tokens + max_tokens)


def request_reservation_blocks(cfg: MemoryConfig, prompt_tokens: int, generated_tokens: int) -> int:
    return reservation_blocks(prompt_tokens + generated_tokens, cfg.lookahead_tokens, cfg.block_tokens)


def instance_reservation_blocks(cfg: MemoryConfig, requests: Iterable[tuple[int, int]]) -> int:
    """Sum of reservations over (prompt, generated) pairs."""
    return sum(request_reservation_blocks(cfg, p, g) for p, g in requests)


def resize_target(cfg: MemoryConfig, current_blocks: int, reserved_blocks: int) -> int | None:
    """New size for an instance holding current_blocks whose requests reserve reserved_blocks,
    or None to stay. Grows to reservation x watermark when the reservation no longer fits;
    shrinks to that target only when it is below current / watermark."""
    target = max(cfg.min_instance_blocks, math.ceil(reserved_blocks * cfg.watermark)) if reserved_blocks else 0
    if reserved_blocks > current_blocks:
        return target
    if target < current_blocks / cfg.watermark:
        return target
    return None


@dataclass(frozen=True)
class KVHolding:
    """An instance's KV as admission sees it: blocks it holds, blocks its requests reserve, and
    blocks it lends: held only for cached prompt prefixes, beyond what it needs, which the device
    takes back before any grow or load goes short."""

    held_blocks: int
    reserved_blocks: int
    bytes_per_block: int
    lent_blocks: int = 0


def admissible_blocks(free_bytes: int, holdings: Iterable[KVHolding], target: KVHolding) -> int:
    """Blocks a new request on ``target`` may reserve: memory actually free or lent by other
    instances, minus reservations already admitted but not yet backed by a grow (else two
    admissions in a row would count the same free memory), plus the target's own slack (held
    beyond what its requests reserve, its own cached blocks included)."""
    holdings = list(holdings)
    unmet = sum(max(0, h.reserved_blocks - h.held_blocks) * h.bytes_per_block for h in holdings)
    lent = sum(h.lent_blocks * h.bytes_per_block for h in holdings if h is not target)
    slack = max(0, target.held_blocks - target.reserved_blocks)
    return max(0, free_bytes + lent - unmet) // target.bytes_per_block + slack


class ActionKind(enum.Enum):
    LOAD = "load"  # weights + initial KV
    UNLOAD = "unload"
    GROW = "grow"
    SHRINK = "shrink"


class ActionState(enum.Enum):
    """QUEUED -> IN_FLIGHT -> DONE. Releases (shrink/unload) go IN_FLIGHT at once; claims
    (grow/load) stay QUEUED until memory that has really been freed covers them."""

    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DONE = "done"


@dataclass
class Action:
    action_id: int
    kind: ActionKind
    instance_id: str
    amount: int  # memory claimed (grow/load) or released (shrink/unload); the device uses bytes
    state: ActionState = ActionState.QUEUED

    @property
    def claims(self) -> bool:
        return self.kind in (ActionKind.LOAD, ActionKind.GROW)


class DeviceActions:
    """The reservation station of one device. Memory in one unit (the runtime uses bytes):
    committed = memory held or claimed by committed actions; free = budget - committed.
    A release reduces `committed` only when it completes."""

    def __init__(self, budget: int):
        if budget <= 0:
            raise ValueError(f"budget must be > 0, got {budget}")
        self.budget = budget
        self.committed = 0
        self._next_id = 0
        self._queue: deque[Action] = deque()  # claims waiting for memory, FIFO
        self._actions: dict[int, Action] = {}

    @property
    def free(self) -> int:
        return self.budget - self.committed

    @property
    def pending_claims(self) -> int:
        return sum(a.amount for a in self._queue)

    def submit(self, kind: ActionKind, instance_id: str, amount: int) -> Action:
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        a = Action(self._next_id, kind, instance_id, amount)
        self._next_id += 1
        self._actions[a.action_id] = a
        if a.claims:
            if amount > self.budget:
                raise ValueError(f"{kind.value} of {amount} exceeds the device budget {self.budget}")
            self._queue.append(a)
        else:
            a.state = ActionState.IN_FLIGHT  # a release can start now; its memory counts once done
        return a

    def ready(self) -> list[Action]:
        """Commit queued claims, in order, that fit in memory actually free now. The caller
        executes what is returned and reports complete(). FIFO: a large claim at the head is not
        overtaken (no starvation)."""
        out: list[Action] = []
        while self._queue and self._queue[0].amount <= self.free:
            a = self._queue.popleft()
            a.state = ActionState.IN_FLIGHT
            self.committed += a.amount
            out.append(a)
        return out

    def complete(self, action_id: int) -> None:
        a = self._actions.pop(action_id)
        if a.state is not ActionState.IN_FLIGHT:
            raise ValueError(f"action {action_id} is {a.state.value}, not in flight")
        a.state = ActionState.DONE
        if not a.claims:
            self.committed -= a.amount
            if self.committed < 0:
                raise ValueError("released more memory than was committed")

    def adopt(self, amount: int) -> None:
        """Count memory already held at start-up (e.g. rebuilt from status)."""
        if amount > self.free:
            raise ValueError(f"cannot adopt {amount}; {self.free} free")
        self.committed += amount
