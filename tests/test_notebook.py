"""notebooks/colab_tpu_quickstart.ipynb runs top to bottom on CPU with tiny models.

The notebook's one parameters cell is followed by an injected cell that substitutes a tiny random
Hugging Face MoE (Qwen2-MoE layout, as Qwen1.5-MoE-A2.7B) and a tiny dense draft sharing its tokenizer,
few tokens, a small server and a one-level bench; nbclient raises on any cell error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "colab_tpu_quickstart.ipynb"
VOCAB = 320
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
               pad_token_id=0)


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "add_bos_token": False}))


def tiny_hf_pair(root: Path) -> tuple[Path, Path]:
    """A random Qwen2-MoE target and a random Qwen2 draft, saved as Hugging Face folders."""
    torch.manual_seed(0)
    target, draft = root / "tiny-qwen2-moe", root / "tiny-qwen2-draft"
    transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **_COMMON, intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2)).eval().save_pretrained(target)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **{**_COMMON, "num_hidden_layers": 1}, intermediate_size=48)).eval().save_pretrained(draft)
    for d in (target, draft):
        _write_tokenizer(d)
    return target, draft


def outputs_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append(o.get("text", ""))
        parts += [str(v) for k, v in o.get("data", {}).items() if k.startswith("text/")]
    return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_with_tiny_models(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    target, draft = tiny_hf_pair(tmp_path)
    overrides = dict(
        INSTALL=False, REQUIRE_TPU=False, MODEL="builtin", DRAFT="builtin", HF_MODEL=str(target),
        HF_DRAFT=str(draft), HF_PROMPT="def fibonacci(n):", DTYPE="float32", MESH="auto", MAX_TOKENS=8, MAX_LEN=64,
        SPEC_K=2, SERVE_MODEL=str(target), SERVE_DRAFT=str(draft), SERVE_SLOTS=2, SERVE_MAX_LEN=64,
        SERVE_TIMEOUT=300, BENCH_CONFIGS=["none", "draft:k=2"], BENCH_CONCURRENCY=[1], BENCH_REQUESTS=3,
        BENCH_WORKLOAD="synthetic:in=8,out=8", WORK_DIR=str(tmp_path / "run"),
    )
    # Every name the test sets must be one the notebook reads, or the substitution silently does nothing.
    assert set(overrides) <= set(_assigned_names(nb.cells[params[0]].source))
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in overrides.items()), metadata={"tags": ["injected-parameters"]}))
    # One CPU device, as on a user's machine (conftest gives this process 8 virtual ones).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(None)}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError naming the cell that failed

    text = "\n".join(outputs_text(c) for c in nb.cells)
    assert "acceptance per position" in text and "| same tokens | | True |" in text
    assert "SERVING on 127.0.0.1:" in text and "streamed text equals the unary reply: True" in text
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert pngs, "the bench cell showed no plots"
    assert list((tmp_path / "run" / "bench").glob("*.png")) and (tmp_path / "run" / "bench" / "results.json").exists()


def _assigned_names(source: str) -> list[str]:
    import ast

    return [t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)]
