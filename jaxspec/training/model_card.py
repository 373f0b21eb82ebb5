"""MODEL_CARD.md for the built-in models, rendered from the reports the tools write.

Inputs: eval.json (tools/eval_builtin.py), the target's training_report.json
(tools/train.py), the draft's distill_report.json (tools/distill_draft.py) and
the tokenizer's tokenizer_report.json (tools/train_tokenizer.py). A missing
report leaves its section saying so rather than inventing figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _params(counts: dict) -> str:
    return f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active per token"


def _config_rows(cfg: dict) -> str:
    keys = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
            "num_experts", "num_experts_per_tok", "moe_mlp_dim", "max_seq_len", "tie_embeddings", "dtype")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg and (cfg[k] or k in ("num_experts",)))


def _cost_paragraph(costs: dict | None, acc: dict) -> list[str]:
    """Where a speculative step's model time goes, from ``acceptance.forward_costs``."""
    if not costs:
        return []
    k = costs["k"]
    t1, tk, d1 = costs["target_ms_1"], costs[f"target_ms_{k + 1}"], costs["draft_ms_1"]
    length = acc["mean_acceptance_length"]
    per_token = (tk + k * d1) / length
    lines = [
        f"Where the time goes (jitted forwards alone, batch 1, median of {costs['reps']}): the target takes "
        f"{t1:.2f} ms for 1 token and {tk:.2f} ms for the {k + 1} tokens of a verification ({tk / t1:.1f}x); "
        f"the draft {d1:.2f} ms per token.",
    ]
    touched = costs.get(f"experts_touched_{k + 1}")
    if touched is not None:
        lines[-1] += (f" {k + 1} consecutive held-out tokens route to {touched:.1f} of the "
                      f"{costs['experts_per_layer']} experts of a layer on average, one token to "
                      f"{costs['experts_touched_1']}: on CPU at batch 1 the MoE step costs per expert used, so a "
                      "verification pays for most experts of every layer.")
    lines[-1] += (f" Model time per emitted token with speculation is ({tk:.2f} + {k} x {d1:.2f}) / {length:.2f} = "
                  f"{per_token:.2f} ms against {t1:.2f} ms for plain decoding ({t1 / per_token:.2f}x); the rest of "
                  "the end-to-end difference is per-step host work, which speculation amortises over the tokens "
                  "of a step.")
    return [lines[0], ""]


def _step_split(speed: dict) -> str:
    """Where a speculative step's time went. The fused step (drafting, verification and the draft
    cache's rollback in one jitted call) reports all of it as verification time and none as drafting."""
    draft, verify = speed.get("draft_ms_per_step"), speed.get("verify_ms_per_step")
    if draft is not None and verify and draft < 0.01 * verify:  # microseconds of host work: fused
        return f"{_f(verify, 1)} ms drafting and verifying in one fused call"
    return f"{_f(draft, 1)} ms drafting + {_f(verify, 1)} ms verifying"


def _speed_advice(speed: dict, is_moe: bool = True) -> list[str]:
    """Say plainly when speculation did not pay on the machine that measured it."""
    if speed.get("speedup", 1.0) >= 1.0:
        return []
    why = "see above for why it does not here" if is_moe else "see above for what it costs here"
    return [f"On this machine speculation is slower than plain decoding ({speed['speedup']:.2f}x at k={speed['k']}): "
            "`--spec-method none` decodes faster here. Speculation pays where a forward over k+1 tokens costs "
            f"little more than over one ({why}).", ""]


def _use_lines(is_moe: bool) -> list[str]:
    if is_moe:
        return [
            "python -m jaxspec.generate \"def fibonacci(n):\"                      # built-in target + draft",
            "python -m jaxspec.generate --spec-method none \"def fibonacci(n):\"   # the target alone (same text)",
            "python -m jaxspec.serve                                            # both over gRPC",
        ]
    return [
        "python -m jaxspec.generate --model builtin-dense \"def fibonacci(n):\"                      # dense target + draft",
        "python -m jaxspec.generate --model builtin-dense --spec-method none \"def fibonacci(n):\"   # the target alone",
        "python -m jaxspec.serve --model builtin-dense                                            # both over gRPC",
    ]


def render_model_card(eval_results: dict, target_dir: Path, draft_dir: Path, tokenizer_dir: Path | None,
                      rebuild_command: str) -> str:
    train = _load(target_dir / "training_report.json")
    distill = _load(draft_dir / "distill_report.json")
    tok = _load(tokenizer_dir / "tokenizer_report.json") if tokenizer_dir else None
    target_cfg = json.loads((target_dir / "config.json").read_text())
    draft_cfg = json.loads((draft_dir / "config.json").read_text())
    ev = eval_results
    bpb, xz, acc, speed = ev["bits_per_byte"], ev["xz"], ev["acceptance"], ev["throughput"]
    c = ev["corpus"]
    is_moe = bool(target_cfg.get("num_experts"))
    if ev.get("corpus_is_stdlib"):
        source = (f"{c['documents']} `.py` files ({c['bytes'] / 1e6:.2f} MB) of the CPython "
                  f"{ev['environment']['python']} standard library (PSF licence), without the directories listed in "
                  "`jaxspec.training.corpus.STDLIB_EXCLUDE_DIRS` (test suites, site-packages, generated tables, "
                  "GUI demos).")
    else:
        source = f"{c['documents']} files ({c['bytes'] / 1e6:.2f} MB) from `{c['source']}`."
    if is_moe:
        intro = [
            "# jaxspec built-in models",
            "",
            "A small Mixture-of-Experts Python code model (the target) and a dense draft distilled from it,",
            "shipped so that `python -m jaxspec.generate` and speculative decoding work out of the box on CPU.",
            "They are demonstration models: trained for about an hour on two CPU cores, they write",
            "Python-looking text, not reliable code.",
        ]
    else:
        intro = [
            "# jaxspec built-in dense models (`--model builtin-dense`)",
            "",
            "A small dense Python code model (the target) and a dense draft distilled from it: the dense",
            "counterpart of the built-in Mixture-of-Experts pair (`--model builtin`, `../MODEL_CARD.md`) for",
            "comparing MoE and dense at equal active size. The target has the MoE target's shape with one dense",
            "MLP as wide as the MoE's active experts together (experts per token x expert width), so both",
            "compute with the same parameters per token (the MoE adds only its router); same tokenizer, corpus,",
            "split and training recipe. Demonstration models: they write Python-looking text, not reliable code.",
        ]
    lines = [
        *intro,
        "",
        "## Data",
        "",
        f"- Corpus: {source}",
        f"- Split: {c['split_rule']}, the id being the path relative to the corpus root: "
        f"{c['heldout_documents']} held-out files ({c['heldout_bytes'] / 1e3:.0f} kB), "
        "never seen by the tokenizer or either model.",
        "",
        "## Tokenizer",
        "",
    ]
    if tok:
        h = tok.get("heldout") or {}
        lines += [
            f"sentencepiece BPE, {tok['vocab_size']} pieces, byte fallback, no normalisation (whitespace and "
            f"indentation preserved exactly), split digits; ids pad=0 bos=1 eos=2 unk=3. "
            f"{_f(h.get('bytes_per_token'))} bytes per token on the held-out files; decode(encode(x)) == x on all "
            f"{tok['roundtrip_documents']} held-out files ({len(tok['roundtrip_failures'])} failures).",
        ]
    else:
        lines.append("(no tokenizer_report.json found)")
    lines += ["", "## Target (MoE)" if is_moe else "## Target (dense)", "", f"`{_config_rows(target_cfg)}`", ""]
    if train and not is_moe:
        lines += [
            f"- Parameters: {_params(train['params'])}.",
            f"- Training: {train['steps']} steps of {train['batch_size']} x {train['seq_len']} tokens "
            f"({train['tokens_seen'] / 1e6:.2f}M tokens, {train['epochs']:.2f} epochs), AdamW (peak lr "
            f"{train['optimizer']['lr']}, warm-up {train['optimizer']['warmup_steps']}, cosine to "
            f"{train['optimizer']['min_lr_ratio']} x, weight decay {train['optimizer']['weight_decay']}, gradient "
            f"clipping {train['optimizer']['grad_clip']}), cross entropy only (no router, so no load-balancing or "
            f"z-loss); {train['train_seconds'] / 60:.1f} min on {train['environment']['cpu_count']} CPU cores.",
            f"- Final training loss {_f(train['final_train'].get('ce'))} nats/token.",
        ]
    elif train:
        lines += [
            f"- Parameters: {_params(train['params'])}.",
            f"- Training: {train['steps']} steps of {train['batch_size']} x {train['seq_len']} tokens "
            f"({train['tokens_seen'] / 1e6:.2f}M tokens, {train['epochs']:.2f} epochs), AdamW (peak lr "
            f"{train['optimizer']['lr']}, warm-up {train['optimizer']['warmup_steps']}, cosine to "
            f"{train['optimizer']['min_lr_ratio']} x), load-balancing loss weight {train['loss']['aux_weight']}, "
            f"router z-loss weight {train['loss']['z_weight']}, capacity factor "
            f"{train['loss']['capacity_factor'] or 'none (dropless)'}; {train['train_seconds'] / 60:.1f} min on "
            f"{train['environment']['cpu_count']} CPU cores.",
            f"- Final training loss {_f(train['final_train'].get('ce'))} nats/token.",
        ]
    else:
        lines.append("(no training_report.json found)")
    lines += ["", "## Draft (dense)", "", f"`{_config_rows(draft_cfg)}`", ""]
    if distill:
        b, a = distill["before"], distill["after"]
        lines += [
            f"- Parameters: {_params(distill['draft_params'])}; the target has "
            f"{distill['active_param_ratio']:.1f}x the draft's active parameters.",
            f"- Distillation: {distill['steps']} steps of {distill['batch_size']} sequences on "
            f"{distill['sequences']} target continuations ({distill['sampled_fraction']:.0%} sampled at temperature "
            f"{distill['temperature']}, the rest greedy), loss `{distill['loss']}` on the target's full "
            f"distributions; {distill['train_seconds'] / 60:.1f} min (+{distill['generation_seconds'] / 60:.1f} min "
            "generating).",
            f"- Held-out KL {_f(b['divergences']['eval_kl'])} -> {_f(a['divergences']['eval_kl'])}, "
            f"TV {_f(b['divergences']['eval_tv'])} -> {_f(a['divergences']['eval_tv'])}, argmax agreement "
            f"{_f(b['divergences']['eval_agree'])} -> {_f(a['divergences']['eval_agree'])}.",
        ]
    else:
        lines.append("(no distill_report.json found)")
    balance = ", ".join(f"{x:.2f}" for x in bpb["expert_balance_per_layer"])
    lines += [
        "",
        "## Evaluation (held-out files)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| target bits per byte | {_f(bpb['bits_per_byte'])} |",
        f"| `xz -9e` bits per byte, each file alone | {_f(xz['xz_per_file_bpb'])} |",
        f"| `xz -9e` bits per byte, files concatenated | {_f(xz['xz_concatenated_bpb'])} |",
        f"| draft acceptance rate (greedy, k={acc['k']}) | {_f(acc['acceptance_rate'])} |",
        f"| mean acceptance length (tokens per verification, greedy, k={acc['k']}) | "
        f"{_f(acc['mean_acceptance_length'])} |",
        f"| plain decoding, batch 1 | {_f(speed['plain_tokens_per_s'], 1)} tokens/s |",
        f"| speculative decoding (draft, k={speed['k']}), batch 1 | {_f(speed['speculative_tokens_per_s'], 1)} "
        f"tokens/s ({_f(speed['speedup'], 2)}x; per step {_step_split(speed)} of {_f(speed.get('step_ms'), 1)} ms) |",
        *([f"| speculative decoding, adaptive k (serving's default), batch 1 | "
           f"{_f(speed['adaptive_tokens_per_s'], 1)} tokens/s ({_f(speed['adaptive_speedup'], 2)}x; decode steps "
           f"per k: {', '.join(f'{kb}: {n}' for kb, n in speed['adaptive_steps_per_k'].items())}) |"]
          if "adaptive_tokens_per_s" in speed else []),
        *([f"| expert load max/mean per layer (1.00 = even) | {balance} |"] if is_moe else []),
        "",
        f"Bits per byte: {bpb['tokens']} held-out tokens in windows of {bpb['seq_len']}, eos included "
        f"({bpb['bytes']} bytes). Acceptance: {acc['prompts']} held-out prompts, {acc['generated_tokens']} greedy "
        f"tokens. Throughput: {speed['prompts']} prompts x up to {speed['max_tokens']} tokens, end to end "
        f"(prefill included) after compilation, on {ev['environment']['cpu_count']} CPU cores "
        f"({ev['environment']['backend']}, jax {ev['environment']['jax']}); timings depend on machine load.",
        "",
        *_cost_paragraph(ev.get("forward_costs"), acc),
        *_speed_advice(speed, is_moe),
        "## Use",
        "",
        "```bash",
        *_use_lines(is_moe),
        "```",
        "",
        "## Rebuild",
        "",
        "```bash",
        rebuild_command,
        "```",
        "",
    ]
    return "\n".join(lines)
