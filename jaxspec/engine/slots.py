"""Host-side view of the slot table that runners read every step.

The engine owns it; a runner (plain or speculative) reads it to build the
device inputs of one step. Arrays are numpy so that updating one slot costs
nothing on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxspec.engine.request import Request
from jaxspec.sampling import BatchSampling, SamplingParams, seed_to_key_data


@dataclasses.dataclass
class SlotTable:
    num_slots: int

    def __post_init__(self) -> None:
        s = self.num_slots
        self.requests: list[Request | None] = [None] * s
        self.active = np.zeros(s, bool)
        self.last_token = np.zeros(s, np.int32)  # the token the next step feeds in
        self.num_generated = np.zeros(s, np.int32)  # output position of the next token (RNG counter)
        self.temperature = np.zeros(s, np.float32)
        self.top_k = np.zeros(s, np.int32)
        self.top_p = np.ones(s, np.float32)
        self.min_p = np.zeros(s, np.float32)
        self.seed = np.zeros((s, 2), np.uint32)

    def free_slots(self) -> list[int]:
        return [i for i in range(self.num_slots) if self.requests[i] is None]

    def active_slots(self) -> list[int]:
        return [i for i in range(self.num_slots) if self.active[i]]

    def assign(self, slot: int, request: Request) -> None:
        p: SamplingParams = request.params
        self.requests[slot] = request
        self.active[slot] = False  # becomes active once prefill produced its first token
        self.num_generated[slot] = 0
        self.temperature[slot] = p.temperature
        self.top_k[slot] = p.top_k
        self.top_p[slot] = p.top_p
        self.min_p[slot] = p.min_p
        self.seed[slot] = seed_to_key_data(request.seed)

    def release(self, slot: int) -> None:
        self.requests[slot] = None
        self.active[slot] = False
        self.temperature[slot] = 0.0
        self.top_k[slot] = 0
        self.top_p[slot] = 1.0
        self.min_p[slot] = 0.0

    def sampling(self, rows: np.ndarray | None = None) -> BatchSampling:
        """Device sampling settings for all slots (or the given slot rows)."""
        sel = slice(None) if rows is None else rows
        return BatchSampling(
            temperature=self.temperature[sel],
            top_k=self.top_k[sel],
            top_p=self.top_p[sel],
            min_p=self.min_p[sel],
            seed=self.seed[sel],
        )
