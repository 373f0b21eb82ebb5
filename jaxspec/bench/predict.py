"""Predict decode and verification step times, and speculative speed-up, from a roofline.

``python -m jaxspec.bench predict --model mixtral-8x7b --draft small-draft --mesh tpu-v5e-8``

One step of B rows x T tokens over C cached positions costs, per chip,

    time = overhead + collectives + sum over parts of max(part bytes / bandwidth, part flops / peak)

* bytes: attention + dense weights, the router, the DISTINCT experts the N = B x T tokens
  route to (x expert bytes), the embedding rows looked up, the whole LM head, and the K/V
  rows attended (B x C x layers x 2 x kv_heads x head_dim x bytes);
* flops: 2 x active parameters x tokens (LM head included) + attention 4 x N x C x heads x head_dim;
* overhead: a per-step dispatch cost plus a per-kernel cost x kernels executed (``Chip``);
* collectives (multi-chip): all-reduce bytes / link bandwidth (``collective_s``).

Speculation with k drafts: a step verifies k + 1 tokens and drafts k single tokens, and yields
E[k] = sum_{i=0..k} prod_{j<i} a_j tokens per row; speed-up = (E[k] / spec step) x plain step.
docs/predict.md has the derivations, the chip table's sources and the CPU validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

from jaxspec.bench.chips import (CHIP_NAMES, CHIPS, DTYPE_BYTES, Chip, HloCounts, roofline_tool,  # noqa: F401
                                 count_hlo_ops, cpu_hlo_counter, describe_chip, probe_cpu, step_hlo)
from jaxspec.config import ConfigError, ModelConfig, config_dir, load_config


# ----------------------------------------------------------------------------- meshes
@dataclasses.dataclass(frozen=True)
class Split:
    """How a mesh divides one model over chips (``configs/meshes``: data x expert x tensor)."""

    name: str = "1 chip"
    data: int = 1
    expert: int = 1
    tensor: int = 1

    @property
    def chips(self) -> int:
        return self.data * self.expert * self.tensor


def load_split(name: str | None) -> tuple[Split, str | None]:
    """The mesh's axis sizes and the chip its name or platform implies (None if unknown)."""
    if not name:
        return Split(), None
    path = Path(name) if name.endswith(".json") else config_dir() / "meshes" / f"{name}.json"
    if not path.exists():
        raise ConfigError(f"unknown mesh {name!r}; see {config_dir() / 'meshes'}")
    data = json.loads(path.read_text())
    axes = data["axes"]
    stem = path.stem
    chip = next((c for c in ("tpu-v5e", "tpu-v5p", "h200", "h100") if c.replace("tpu-", "") in stem), None)
    if chip is None and data.get("platform") == "cpu":
        chip = "cpu"
    return Split(stem, axes.get("data", 1), axes.get("expert", 1), axes.get("tensor", 1)), chip


# ----------------------------------------------------------------------------- routing
def expected_distinct_experts(tokens: float, num_experts: int, top_k: int) -> float:
    """E x (1 - (1 - k/E)^N): distinct experts N uniformly routed top-k tokens reach in a layer.

    A token picks k of E experts, so it picks a given expert with probability k/E; tokens route
    independently, so an expert is missed by all N with probability (1 - k/E)^N, and by
    linearity of expectation the expected number reached is E times the chance of one being hit.
    """
    if num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def distinct_from_loads(tokens: float, loads: Sequence[float], top_k: int) -> float:
    """Expected distinct experts for measured load fractions p_e (shares of all assignments, sum 1).

    A token includes expert e with probability q_e = min(1, k p_e) (k assignments per token),
    so the expected count is sum_e 1 - (1 - q_e)^N; uniform p_e = 1/E gives the formula above.
    """
    total = float(sum(loads))
    if total <= 0:
        raise ValueError("routing stats: a layer's expert loads sum to zero")
    return sum(1.0 - (1.0 - min(1.0, top_k * p / total)) ** tokens for p in loads)


def load_routing_stats(path: str) -> list[list[float]]:
    """Per-layer expert loads from JSON: [[...], ...], or {"expert_load" | "layers": [[...], ...]}.

    Counts or fractions; each layer is normalised."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("expert_load", data.get("layers"))
    if not isinstance(data, list) or not data or not all(isinstance(r, list) and r for r in data):
        raise ValueError(f"{path}: expected per-layer lists of expert loads")
    return [[float(x) for x in row] for row in data]


# ----------------------------------------------------------------------------- acceptance
def expected_tokens(acceptance: Sequence[float], k: int) -> float:
    """E[k] = sum_{i=0..k} prod_{j<i} a_j: tokens a row gains from k drafts (the +1 is the token
    verification always yields). a_j = chance draft j is accepted given the earlier ones were;
    positions past the profile repeat its last value."""
    total, alive = 1.0, 1.0
    for j in range(k):
        alive *= acceptance[min(j, len(acceptance) - 1)]
        total += alive
    return total


def load_acceptance_profile(path: str) -> list[float]:
    """Conditional per-position acceptance a_j from JSON, in either form:

    * a list, or {"acceptance": [...]}: a_j itself (draft j accepted given drafts < j were);
    * {"acceptance_per_position": [...]} (a bench result row, or the first such row of its
      "rows"): what the engine measures, accepted / drafted at position j = the chance drafts
      0..j are ALL accepted, c_j = prod_{i<=j} a_i; converted as a_0 = c_0, a_j = c_j / c_{j-1}.
    """
    data = json.loads(Path(path).read_text())
    cumulative = None
    if isinstance(data, dict):
        rows = [r for r in data.get("rows", []) if isinstance(r, dict) and r.get("acceptance_per_position")]
        cumulative = data.get("acceptance_per_position") or (rows[0]["acceptance_per_position"] if rows else None)
        data = data.get("acceptance", data.get("per_position")) if cumulative is None else None
    if cumulative is not None:
        data = [c / prev if prev > 0 else 0.0 for c, prev in zip(cumulative, [1.0] + list(cumulative[:-1]))]
    if not isinstance(data, list) or not data or not all(0.0 <= float(a) <= 1.0 + 1e-9 for a in data):
        raise ValueError(f"{path}: expected per-position acceptance probabilities in [0, 1]")
    return [min(float(a), 1.0) for a in data]


# ----------------------------------------------------------------------------- one step
@dataclasses.dataclass
class StepCost:
    """One forward step on one chip: its parts (name -> (bytes, flops, FLOP/s for its shape))."""

    rows: int
    tokens: int
    parts: dict[str, tuple[float, float, float]]
    bandwidth: float
    peak_flops: float
    overhead_s: float
    collective_s: float
    experts_per_layer: float
    moved_bytes: float = 0.0  # copies / transposes the compiled step adds (CPU: from its HLO)
    move_bandwidth: float = 0.0
    sliced_bytes: float = 0.0  # contiguous slice copies it adds (stream at the bandwidth)

    @property
    def bytes(self) -> float:
        return sum(p[0] for p in self.parts.values()) + self.moved_bytes + self.sliced_bytes

    @property
    def move_s(self) -> float:
        return self.moved_bytes / (self.move_bandwidth or self.bandwidth) + self.sliced_bytes / self.bandwidth

    @property
    def flops(self) -> float:
        return sum(p[1] for p in self.parts.values())

    def _split(self) -> tuple[float, float]:
        """Seconds of the parts limited by bytes, and of those limited by FLOPs."""
        by_bytes = by_flops = 0.0
        for b, f, rate in self.parts.values():
            if b / self.bandwidth >= f / rate:
                by_bytes += b / self.bandwidth
            else:
                by_flops += f / rate
        return by_bytes, by_flops

    @property
    def roofline_s(self) -> float:
        """The classic whole-step bound: max(bytes / bandwidth, flops / peak)."""
        return max(sum(p[0] for p in self.parts.values()) / self.bandwidth, self.flops / self.peak_flops)

    @property
    def compute_s(self) -> float:
        """Each part limited by its own bytes or FLOPs, parts one after another (>= roofline_s):
        a step's kernels run in sequence, so a FLOP-bound expert matmul does not hide a
        bytes-bound attention read. Copies the compiled step adds are bytes-bound."""
        return sum(self._split()) + self.move_s

    @property
    def bound(self) -> str:
        by_bytes, by_flops = self._split()
        return "bytes" if by_bytes + self.move_s >= by_flops else "flops"

    @property
    def time_s(self) -> float:
        return self.overhead_s + self.collective_s + self.compute_s


@dataclasses.dataclass
class Predictor:
    """Step-time model of one model config on one chip and mesh split."""

    cfg: ModelConfig
    chip: Chip
    split: Split = Split()
    dtype_bytes: int = 2
    routing: list[list[float]] | None = None  # measured per-layer expert loads
    touched: list[float] | None = None  # or: distinct experts per MoE layer, as counted in a forward
    # CPU: kernels and data-movement bytes counted from the compiled step, f(rows, tokens, context);
    # None = the structural kernel estimate of ``kernels`` and no extra movement.
    hlo: object = None
    # jaxspec's CPU MoE dispatch (per_expert, up to this many tokens; then sorted) runs every
    # chosen expert over ALL N rows; grouped matmuls (accelerators) multiply the routed rows only.
    all_rows_up_to: int = 0
    # ... except where it computes every expert over every row (``dense``), reading all E experts:
    # f(tokens, top_k, E) -> whether it does (``moe_dispatch.cpu_computes_every_expert``; None: never).
    every_expert: Callable[[int, int, int], bool] | None = None

    def experts_touched(self, moe_layer: int, tokens: int) -> float:
        cfg = self.cfg
        if self.touched:
            return self.touched[min(moe_layer, len(self.touched) - 1)]
        if self.routing:
            loads = self.routing[min(moe_layer, len(self.routing) - 1)]
            return distinct_from_loads(tokens, loads, cfg.num_experts_per_tok)
        return expected_distinct_experts(tokens, cfg.num_experts, cfg.num_experts_per_tok)

    def step(self, rows: int, tokens: int, context: int) -> StepCost:
        """B = rows, T = tokens per row, C = context positions attended per row; per chip."""
        cfg, sp, nb = self.cfg, self.split, self.dtype_bytes
        local_rows = math.ceil(rows / sp.data)  # the data axis splits rows (and their cache slots)
        n = local_rows * tokens
        d, dh, tp, ep = cfg.d_model, cfg.head_dim, sp.tensor, sp.expert
        kv_heads = cfg.num_kv_heads / math.gcd(tp, cfg.num_kv_heads)  # split only as far as they divide
        parts: dict[str, list[float]] = {}
        peak_at = self.chip.peak_at

        def add(name: str, params: float, flops: float, rate: float) -> None:
            # rate: the chip's matmul FLOP/s at this part's (rows, inner dimension)
            part = parts.setdefault(name, [0.0, 0.0, rate])
            part[0] += params * nb
            part[1] += flops

        head = cfg.vocab_size * d / tp  # LM head (or tied embedding) read whole, vocab split
        add("embedding rows", n * d, 0.0, self.chip.peak_flops)
        add("lm head", head, 2.0 * n * head, peak_at(n, d))
        touched_sum, moe_layers = 0.0, 0
        for layer in range(cfg.num_layers):
            attn = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) / tp
            add("attention weights", attn, 2.0 * n * attn, peak_at(n, d))
            kv = local_rows * context * 2 * kv_heads * dh
            # Attention: per row and KV head, [T x group, head_dim] x [head_dim, C] matmuls.
            add("kv cache", kv, 4.0 * n * context * cfg.num_heads * dh / tp,
                peak_at(tokens * cfg.num_query_groups, dh))
            if cfg.layer_is_moe(layer):
                touched = self.experts_touched(moe_layers, n)
                touched_sum += touched
                moe_layers += 1
                router = d * cfg.num_experts  # replicated: every chip routes its own tokens
                add("router", router, 2.0 * n * router, peak_at(n, d))
                expert = 3 * d * cfg.moe_mlp_dim / tp  # one expert's width slice on this chip
                # Experts over ep chips: each holds E/ep of them, so on average touched/ep are read.
                read = touched
                if self.every_expert is not None and self.every_expert(n, cfg.num_experts_per_tok, cfg.num_experts):
                    read = cfg.num_experts
                all_rows = n <= self.all_rows_up_to
                rows_x_experts = n * (read if all_rows else cfg.num_experts_per_tok) / ep
                expert_rows = n if all_rows else max(1.0, n * cfg.num_experts_per_tok / max(touched, 1.0))
                add("experts", read / ep * expert, 2.0 * rows_x_experts * expert, peak_at(expert_rows, d))
                shared = 3 * d * cfg.shared_expert_mlp_dim / tp
                if shared:
                    add("shared expert", shared, 2.0 * n * shared, peak_at(n, d))
            else:
                mlp = 3 * d * cfg.mlp_dim / tp
                add("dense mlp", mlp, 2.0 * n * mlp, peak_at(n, d))
        share = touched_sum / moe_layers / cfg.num_experts if moe_layers else 0.0
        kernels, (moved, sliced), call_s = self.kernels(rows, tokens, context, share)
        # What each step re-reads (weights, KV) decides whether it streams from cache; the copies
        # reuse their buffers and do not add to it.
        bandwidth = self.chip.stream_bandwidth(sum(v[0] for v in parts.values()))
        return StepCost(rows, tokens, {k: tuple(v) for k, v in parts.items()}, bandwidth,
                        self.chip.peak_flops, call_s + kernels * self.chip.op_overhead_s,
                        self.collective_s(n), touched_sum / moe_layers if moe_layers else 0.0,
                        moved, self.chip.move_bandwidth, sliced)

    def kernels(self, rows: int, tokens: int, context: int, expert_share: float):
        """(kernels executed, (transposed, sliced) extra bytes, per-call overhead seconds) of one step."""
        if self.hlo is not None:
            counts = self.hlo(rows, tokens, context)
            ops, moved, sliced = counts.at(expert_share)
            return ops, (moved, sliced), self.chip.step_overhead_s if counts.call_s is None else counts.call_s
        # Structural estimate for compiled accelerator steps: per layer ~2 norms, qkv, rope,
        # cache update, 2 attention matmuls + softmax, output proj, MLP or router + grouped
        # matmuls (~12 fused kernels); plus embedding, final norm, LM head.
        return 12.0 * self.cfg.num_layers + 4.0, (0.0, 0.0), self.chip.step_overhead_s

    def collective_s(self, tokens: int) -> float:
        """All-reduce time per step (simplified: ring all-reduce, nothing overlapped with compute).

        Per layer the attention output and the MLP / MoE output are all-reduced over the chips
        that split them (tensor, and expert+tensor for the psum exchange), [N, d] each; the
        LM head's vocab-split logits are gathered once. Ring all-reduce moves 2 (p-1)/p x bytes
        per chip; activations in the weight dtype, logits in float32."""
        sp, cfg = self.split, self.cfg
        if sp.tensor * sp.expert == 1 or not self.chip.link_bandwidth:
            return 0.0
        act = tokens * cfg.d_model * self.dtype_bytes
        moved, count = 0.0, 0
        for layer in range(cfg.num_layers):
            for p in (sp.tensor, sp.expert * sp.tensor if cfg.layer_is_moe(layer) else sp.tensor):
                if p > 1:
                    moved += 2 * (p - 1) / p * act
                    count += 1
        if sp.tensor > 1:
            moved += (sp.tensor - 1) / sp.tensor * tokens * cfg.vocab_size * 4
            count += 1
        return moved / self.chip.link_bandwidth + count * self.chip.collective_latency_s

    def weight_bytes_per_chip(self) -> float:
        cfg, sp = self.cfg, self.split
        moe_layers = sum(cfg.layer_is_moe(i) for i in range(cfg.num_layers))
        experts = moe_layers * cfg.num_experts * 3 * cfg.d_model * cfg.moe_mlp_dim
        rest = cfg.param_counts()["total"] - experts
        return (rest / sp.tensor + experts / (sp.tensor * sp.expert)) * self.dtype_bytes


# ----------------------------------------------------------------------------- building one
def load_model_config(spec: str, role: str = "target") -> ModelConfig:
    """A config name (configs/models), a model directory with config.json, a JSON file, or
    ``builtin`` (the shipped model of ``role``)."""
    from jaxspec import builtin

    path = Path(builtin.resolve(spec, role))
    if path.is_dir():
        path = path / "config.json"
    return load_config(path if path.exists() else spec)


def make_predictor(cfg: ModelConfig, chip: Chip, split: Split, dtype_bytes: int,
                   routing: list[list[float]] | None = None, cache_len: int | None = None) -> Predictor:
    if chip.name != "cpu":
        return Predictor(cfg, chip, split, dtype_bytes, routing)
    from jaxspec.models.moe_dispatch import CPU_PER_EXPERT_MAX_TOKENS, cpu_computes_every_expert

    return Predictor(cfg, chip, split, dtype_bytes, routing, hlo=cpu_hlo_counter(cfg, cache_len),
                     all_rows_up_to=CPU_PER_EXPERT_MAX_TOKENS, every_expert=cpu_computes_every_expert)


def resolve_chip(args, mesh_chip: str | None) -> Chip:
    name = args.chip or mesh_chip or "cpu"
    if name not in CHIP_NAMES:
        raise SystemExit(f"unknown chip {name!r}; one of {', '.join(CHIP_NAMES)}")
    if name == "cpu":  # both rates given: skip the probe (overheads then 0 unless given too)
        chip = probe_cpu() if args.peak_gflops is None or args.bandwidth_gbs is None else \
            Chip("cpu", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, source="given")
    else:
        chip = CHIPS[name]
    changes = {}
    if args.peak_gflops is not None:
        changes["peak_flops"] = args.peak_gflops * 1e9
    if args.bandwidth_gbs is not None:
        changes["bandwidth"] = args.bandwidth_gbs * 1e9
    if args.step_overhead_us is not None:
        changes["step_overhead_s"] = args.step_overhead_us * 1e-6
    if args.op_overhead_us is not None:
        changes["op_overhead_s"] = args.op_overhead_us * 1e-6
    return dataclasses.replace(chip, **changes)


# ----------------------------------------------------------------------------- the table
@dataclasses.dataclass
class Row:
    """Predictions for one batch size."""

    batch: int
    plain_ms: float
    plain_bound: str
    verify_ms: dict[int, float]
    spec_ms: dict[int, float]
    tokens_per_step: dict[int, float]
    speedup: dict[int, float]
    best_k: int  # 0 = plain decoding is fastest

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def predict_rows(target: Predictor, draft: Predictor | None, batches: Sequence[int], ks: Sequence[int],
                 context: int, acceptance: Sequence[float]) -> list[Row]:
    """Per batch: plain step, verification per k, speculative step and speed-up per k.

    A speculative step = verify(B, k+1 tokens) + k x draft(B, 1 token) (0 without a draft model:
    n-gram proposals cost no device time); it yields E[k] tokens per row where plain yields 1."""
    rows = []
    for b in batches:
        plain = target.step(b, 1, context)
        verify, spec, gained, speedup = {}, {}, {}, {}
        for k in ks:
            v = target.step(b, k + 1, context).time_s
            d = k * draft.step(b, 1, context).time_s if draft else 0.0
            verify[k], spec[k] = v * 1e3, (v + d) * 1e3
            gained[k] = expected_tokens(acceptance, k)
            speedup[k] = gained[k] / (v + d) * plain.time_s
        best = max(ks, key=lambda k: speedup[k]) if ks else 0
        rows.append(Row(b, plain.time_s * 1e3, plain.bound, verify, spec, gained, speedup,
                        best if ks and speedup[best] > 1.0 else 0))
    return rows


def format_table(rows: list[Row], ks: Sequence[int]) -> str:
    head = ["B", "plain ms", "bound"] + [f"verify ms k={k}" for k in ks] + [f"speed-up k={k}" for k in ks] + \
        ["best k"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.batch), f"{r.plain_ms:.3f}", r.plain_bound] + [f"{r.verify_ms[k]:.3f}" for k in ks] + \
            [f"{r.speedup[k]:.2f}x" for k in ks] + [str(r.best_k) if r.best_k else "0 (plain)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- validation (CPU)
def validate(models: Sequence[str], batches: Sequence[int], tokens: Sequence[int], context: int,
             reps: int, chip: Chip) -> list[dict]:
    """Time jitted forwards of ``models`` here (tools/roofline.py's harness) beside the prediction."""
    from flax import nnx

    roofline = roofline_tool()
    out = []
    for spec in models:
        if chip.source.startswith("measured"):  # re-probe beside each model: a shared machine's load drifts
            probe_cpu.cache_clear()
            chip = probe_cpu()
            print(describe_chip(chip), file=sys.stderr, flush=True)
        model = roofline.build_model(spec, max(context, 512))
        cfg = model.cfg
        graphdef, state = nnx.split(model)
        for b in batches:
            for t in tokens:
                measured, load = roofline.time_forward(graphdef, state, cfg, b, t, context, max(context, 512),
                                                       context, reps)
                # Routing is an input: this forward's distinct experts per layer, counted from its expert
                # load as tools/roofline.py does (a trained router is far from uniform); timing is not.
                touched = [float((load[i] > 0).sum()) for i in range(cfg.num_layers) if cfg.layer_is_moe(i)]
                pred = make_predictor(cfg, chip, Split(), DTYPE_BYTES[cfg.dtype], None, max(context, 512))
                pred.touched = touched or None
                step = pred.step(b, t, context)
                out.append({"model": spec, "B": b, "T": t, "context": context, "measured_ms": measured * 1e3,
                            "predicted_ms": step.time_s * 1e3, "roofline_ms": step.roofline_s * 1e3,
                            "overhead_ms": step.overhead_s * 1e3, "move_ms": step.move_s * 1e3, "bound": step.bound,
                            "chip": describe_chip(chip),
                            "error_pct": (step.time_s / measured - 1.0) * 100.0})
                print(f"# {spec} B={b} T={t}: measured {measured * 1e3:.3f} ms, predicted {step.time_s * 1e3:.3f} ms",
                      file=sys.stderr, flush=True)
    return out


def format_validation(rows: list[dict], bar_pct: float = 30.0) -> str:
    lines = ["| model | B | T | measured ms | predicted ms | error | within 30% | pure roofline ms | copies ms | "
             "overhead ms | bound |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "yes" if abs(r["error_pct"]) <= bar_pct else "**no**"
        lines.append(f"| {r['model']} | {r['B']} | {r['T']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | "
                     f"{r['error_pct']:+.0f}% | {ok} | {r['roofline_ms']:.3f} | {r.get('move_ms', 0.0):.3f} | "
                     f"{r['overhead_ms']:.3f} | {r['bound']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxspec.bench predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="config name, model directory, or builtin")
    p.add_argument("--draft", default=None, help="draft model (config name / directory / builtin); none: "
                   "proposals cost nothing (n-gram)")
    p.add_argument("--mesh", default=None, help="configs/meshes name: chips and how weights split")
    p.add_argument("--chip", default=None, choices=CHIP_NAMES, help="default: implied by --mesh, else cpu")
    p.add_argument("--dtype-bytes", type=int, default=None, help="bytes per weight / KV element")
    p.add_argument("--weight-dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="default: bfloat16 on accelerators, the model's dtype on cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4], help="drafts per step")
    p.add_argument("--context", type=int, default=1024, help="KV positions each row attends over")
    acc = p.add_mutually_exclusive_group()
    acc.add_argument("--acceptance", type=float, default=0.7, help="per-token acceptance rate (geometric)")
    acc.add_argument("--acceptance-profile", default=None, help="JSON: per-position acceptance probabilities")
    p.add_argument("--routing-stats", default=None, help="JSON: per-layer expert loads (default: uniform)")
    p.add_argument("--peak-gflops", type=float, default=None, help="override the chip's matmul peak")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the chip's memory bandwidth")
    p.add_argument("--step-overhead-us", type=float, default=None, help="override the per-step overhead")
    p.add_argument("--op-overhead-us", type=float, default=None, help="override the per-kernel overhead")
    p.add_argument("--json", default=None, help="also write the predictions here ('-': stdout only JSON)")
    p.add_argument("--validate", action="store_true",
                   help="time the --validate-models' forwards on this machine beside the prediction (on an "
                        "accelerator host give its --chip)")
    p.add_argument("--validate-models", nargs="+", default=["builtin-target", "builtin-draft", "builtin"])
    p.add_argument("--validate-context", type=int, default=256)
    p.add_argument("--reps", type=int, default=20, help="timed calls per forward in --validate (median)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    split, mesh_chip = load_split(args.mesh)
    chip = resolve_chip(args, mesh_chip)
    if args.validate:
        import jax

        here = "cpu" if jax.default_backend() == "cpu" else "accelerator"
        if (chip.name == "cpu") != (here == "cpu"):
            raise SystemExit("--validate times forwards on this machine: --chip must name this machine's chip "
                             f"(cpu on a CPU host, the accelerator on a GPU/TPU host; this host: {here})")
        rows = validate(args.validate_models, [1, 8], [1, 5], args.validate_context, args.reps, chip)
        for spec in args.validate_models:
            print(next(r["chip"] for r in rows if r["model"] == spec).replace("# chip", f"# {spec}: chip", 1))
        print(format_validation(rows))
        result = {"chip": dataclasses.asdict(chip), "validation": rows}
        if args.json:
            _write_json(args.json, result)
        return result

    target_cfg = load_model_config(args.model, "target")
    draft_cfg = load_model_config(args.draft, "draft") if args.draft else None
    nb = args.dtype_bytes or (DTYPE_BYTES[args.weight_dtype] if args.weight_dtype else
                              DTYPE_BYTES[target_cfg.dtype] if chip.name == "cpu" else 2)
    routing = load_routing_stats(args.routing_stats) if args.routing_stats else None
    acceptance = load_acceptance_profile(args.acceptance_profile) if args.acceptance_profile else [args.acceptance]
    if not all(0.0 <= a <= 1.0 for a in acceptance):
        raise SystemExit("--acceptance must be in [0, 1]")
    target = make_predictor(target_cfg, chip, split, nb, routing)
    # A small draft is replicated on every chip (jaxspec's draft placement): no split, no collectives,
    # but it runs only the rows of its data shard.
    draft = make_predictor(draft_cfg, chip, Split("draft", data=split.data), nb) if draft_cfg else None
    rows = predict_rows(target, draft, args.batch, args.k, args.context, acceptance)
    weights = target.weight_bytes_per_chip()
    header = (f"# {target_cfg.name}" + (f" + draft {draft_cfg.name}" if draft_cfg else " (no draft model: n-gram)") +
              f" on {split.chips} x {chip.name} ({split.name}: data {split.data} x expert {split.expert} x tensor "
              f"{split.tensor}), {nb} bytes/weight, context {args.context}, acceptance "
              + (f"{args.acceptance} per token" if not args.acceptance_profile else f"profile {acceptance}")
              + f", routing {'measured' if routing else 'uniform'}\n"
              f"# target weights per chip {weights / 2**30:.2f} GiB"
              + (f" of {chip.memory_bytes / 2**30:.0f} GiB: DOES NOT FIT" if chip.memory_bytes and
                 weights > chip.memory_bytes else "")
              + "\n" + describe_chip(chip))
    result = {"model": target_cfg.name, "draft": draft_cfg.name if draft_cfg else None,
              "chip": dataclasses.asdict(chip),
              "mesh": dataclasses.asdict(split), "dtype_bytes": nb, "context": args.context,
              "acceptance": acceptance, "routing": "measured" if routing else "uniform",
              "weight_bytes_per_chip": weights, "rows": [r.to_dict() for r in rows]}
    if args.json == "-":
        print(json.dumps(result, indent=1))
        return result
    print(header)
    print(format_table(rows, args.k))
    if args.json:
        _write_json(args.json, result)
    return result


def _write_json(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
