"""The step loop shared by target training and draft distillation.

Runs jitted steps from the state's step counter to ``total_steps``, fetching
metrics from the device only at log points (so host batch preparation overlaps
device work), writing one JSON line per log/eval event to ``RUN_DIR/metrics.jsonl``
(the ``step`` and ``data_position`` fields let tests and people check a resumed
run continues where it stopped), and checkpointing every ``save_every`` steps,
at the end, and on SIGTERM / Ctrl-C (then it stops early).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from jaxspec.training.data import Batch
from jaxspec.training.state import RunCheckpointer, TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]]
BatchFn = Callable[[int, int], Batch]  # (data position in examples, batch size) -> batch
Summarize = Callable[[list[dict[str, np.ndarray]]], dict[str, float]]


def mean_scalars(metrics: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Average every scalar metric over the logged steps."""
    out: dict[str, float] = {}
    for key in metrics[0]:
        values = [np.asarray(m[key]) for m in metrics]
        if values[0].ndim == 0:
            out[key] = float(np.mean(values))
    return out


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    batch_size: int
    tokens_per_example: int  # for tokens/s
    save_every: int = 200
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    stop_after: int | None = None  # stop (without a final save) after this step: simulates a killed run
    desc: str = "train"


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    data_position: int
    stopped_early: bool
    last_log: dict[str, float]
    last_eval: dict[str, float] | None


class _StopFlag:
    """Turns SIGTERM into a flag the loop checks between steps (so it can save first)."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C/kill behave as usual
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run_loop(
    state: TrainState,
    data_position: int,
    step_fn: StepFn,
    batch_fn: BatchFn,
    cfg: LoopConfig,
    checkpointer: RunCheckpointer,
    meta_fn: Callable[[int], dict],
    log_path: Path,
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
    summarize: Summarize = mean_scalars,
) -> LoopResult:
    """Train from ``state.step`` to ``cfg.total_steps``; ``data_position`` counts examples consumed."""
    step = step0 = int(state.step)
    position0 = data_position
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pending: list[dict[str, Any]] = []
    last_log: dict[str, float] = {}
    last_eval: dict[str, float] | None = None
    t_last, step_last = time.perf_counter(), step

    def log(record: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save() -> None:
        # The position follows from the state's own step counter, so an interrupt landing between
        # a step and the host's bookkeeping can never save a mismatched pair.
        checkpointer.save(state, meta_fn(position0 + (int(state.step) - step0) * cfg.batch_size))

    def evaluate() -> dict[str, float]:
        result = eval_fn(state) if eval_fn is not None else {}
        log({"event": "eval", "step": step, "data_position": data_position, **result})
        if result:
            bar.write(f"[{cfg.desc}] step {step} eval " + " ".join(f"{k}={v:.4g}" for k, v in result.items()))
        return result

    stopped = False
    with _StopFlag() as stop, tqdm(total=cfg.total_steps, initial=step, desc=cfg.desc, dynamic_ncols=True,
                                   mininterval=2.0) as bar:
        try:
            while step < cfg.total_steps:
                batch = batch_fn(data_position, cfg.batch_size)
                state, metrics = step_fn(state, batch)
                step += 1
                data_position += cfg.batch_size
                pending.append(metrics)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    host = jax.device_get(pending)
                    now = time.perf_counter()
                    last_log = summarize(host)
                    last_log["tokens_per_s"] = (step - step_last) * cfg.batch_size * cfg.tokens_per_example / (now - t_last)
                    t_last, step_last, pending = now, step, []
                    log({"event": "train", "step": step, "data_position": data_position, **last_log})
                    bar.set_postfix({k: f"{v:.3g}" for k, v in last_log.items() if k in ("loss", "tokens_per_s")})
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                    last_eval = evaluate()
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                if cfg.stop_after is not None and step >= cfg.stop_after:
                    stopped = True
                    break
                if step % cfg.save_every == 0:
                    save()
                if stop.set:
                    bar.write(f"[{cfg.desc}] SIGTERM: saving step {step} and stopping")
                    save()
                    stopped = True
                    break
        except KeyboardInterrupt:
            bar.write(f"[{cfg.desc}] interrupted: saving step {step}")
            save()
            raise
    if not stopped:
        save()
        last_eval = evaluate()
    return LoopResult(state, data_position, stopped, last_log, last_eval)
