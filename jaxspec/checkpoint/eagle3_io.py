"""EAGLE-3 head checkpoints: read the two published layouts, write the speculators one.

**EAGLE / SpecForge layout** (``config.json`` is a one-layer Llama config):
``draft_vocab_size``, optional ``target_hidden_size``, optional ``eagle_config`` with
``eagle_aux_hidden_state_layer_ids`` (and ``use_aux_hidden_state``); tensors ``fc.weight``
[D, 3*Dt], ``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight``,
``midlayer.self_attn.{q,k,v}_proj.weight`` [*, 2*D], ``midlayer.self_attn.o_proj.weight``,
``midlayer.mlp.{gate,up,down}_proj.weight``, ``norm.weight``, ``lm_head.weight`` [Vd, D], ``d2t``
[Vd] (target id = draft id + d2t), ``t2d`` [V] (bool), optional ``embed_tokens.weight``.

**speculators layout** (vllm-project/speculators, ``speculators_model_type: "eagle3"``):
``transformer_layer_config`` (the Llama layer's config), ``draft_vocab_size``,
``norm_before_residual``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids``,
``speculators_config.proposal_methods[0].speculative_tokens``; the same tensors with the layer
under ``layers.0.`` instead of ``midlayer.``, and an optional ``fc.bias``.

Layer ids, as the peers read them (checked against vLLM's and SGLang's loaders): the
speculators field is used as-is by vLLM, whose capture convention is ours (id i = the residual
stream entering layer i); SGLang reads ``eagle_config.eagle_aux_hidden_state_layer_ids`` as
layer *outputs* and adds one, so we add one too. With no ids the default is (2, L//2, L-3) for an
L-layer target in our convention (what both engines capture by default).
``norm_before_residual``: vLLM defaults a missing value to true, speculators' own config class to
false; a speculators config without it is refused rather than guessed. The original layout has
no such field (false, as SGLang's EAGLE-3 layer does).

Fields are checked against what this implementation does: one whose meaning is not implemented
(``tie_word_embeddings``, ``attention_bias``, ``fc_norm``, ``norm_output``, parallel drafting, ...)
is refused by name, as is any field not known here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from flax import nnx

from jaxspec.checkpoint.hf_config import read_json
from jaxspec.checkpoint.hf_loader import SafetensorsFiles
from jaxspec.checkpoint.orbax_io import CheckpointError
from jaxspec.config import ConfigError, ModelConfig
from jaxspec.models.eagle3 import Eagle3Config, Eagle3Head, default_aux_layers

FORMATS = ("eagle", "speculators")

# Keys every transformers config may carry and that change nothing here.
_BENIGN = {
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "pretraining_tp", "use_cache",
    "attention_dropout", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "has_no_defaults_at_init",
}
# The Llama layer's fields this implementation reads.
_LAYER_FIELDS = {
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_hidden_layers", "rms_norm_eps", "rope_theta", "rope_scaling", "vocab_size", "max_position_embeddings",
    "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
}
_EAGLE_FIELDS = {"draft_vocab_size", "target_hidden_size", "eagle_config", "bias"}  # bias: fc's (SGLang)
_SPECULATORS_FIELDS = {
    "speculators_model_type", "speculators_version", "speculators_config", "transformer_layer_config",
    "draft_vocab_size", "norm_before_residual", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
}
_EAGLE_CONFIG_FIELDS = {"eagle_aux_hidden_state_layer_ids", "use_aux_hidden_state"}

# Our parameter (path in the head) <- tensor name after the layer prefix, and the conversion kind.
_LAYER_TENSORS = {
    "input_layernorm.weight": (("input_norm", "scale"), "vector"),
    "hidden_norm.weight": (("hidden_norm", "scale"), "vector"),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), "vector"),
    "self_attn.q_proj.weight": (("attn", "wq"), "qkv"),
    "self_attn.k_proj.weight": (("attn", "wk"), "qkv"),
    "self_attn.v_proj.weight": (("attn", "wv"), "qkv"),
    "self_attn.o_proj.weight": (("attn", "wo"), "o"),
    "mlp.gate_proj.weight": (("mlp", "w_gate"), "linear"),
    "mlp.up_proj.weight": (("mlp", "w_up"), "linear"),
    "mlp.down_proj.weight": (("mlp", "w_down"), "linear"),
}
_TOP_TENSORS = {
    "fc.weight": (("fc",), "linear"),
    "fc.bias": (("fc_bias",), "vector"),
    "norm.weight": (("final_norm", "scale"), "vector"),
    "lm_head.weight": (("lm_head",), "linear"),
    "embed_tokens.weight": (("embed",), "vector"),
    "d2t": (("d2t",), "index"),
}
_LAYER_PREFIX = {"eagle": "midlayer.", "speculators": "layers.0."}


def detect_format(directory: str | os.PathLike) -> str:
    cfg = read_json(Path(directory) / "config.json")
    return "speculators" if "speculators_model_type" in cfg else "eagle"


def _refuse_unknown(where: str, cfg: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(k for k in cfg if k not in known and k not in _BENIGN)
    if unknown:
        raise ConfigError(f"{where}: field(s) {', '.join(unknown)} are not implemented by jaxspec's EAGLE-3 head")


def _refuse_set(where: str, cfg: dict[str, Any]) -> None:
    """Fields that are read but whose non-default values are not implemented."""
    if cfg.get("num_hidden_layers", 1) != 1:
        raise ConfigError(f"{where}: num_hidden_layers {cfg['num_hidden_layers']}: only one-layer heads are supported")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if cfg.get(name):
            raise ConfigError(f"{where}: {name}=true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")


def _layer_config(where: str, layer: dict[str, Any], *, name: str, vocab: int | None, draft_vocab: int | None,
                  target_hidden: int | None, aux_layers, norm_before_residual: bool, fc_bias: bool,
                  own_embeddings: bool, speculative_tokens: int | None, dtype: str) -> Eagle3Config:
    _refuse_set(where, layer)
    d = int(layer["hidden_size"])
    heads = int(layer["num_attention_heads"])
    vocab = int(vocab if vocab is not None else layer["vocab_size"])
    return Eagle3Config(
        name=name, hidden_size=d, target_hidden_size=int(target_hidden or d), vocab_size=vocab,
        draft_vocab_size=int(draft_vocab or vocab), num_heads=heads,
        num_kv_heads=int(layer.get("num_key_value_heads") or heads),
        head_dim=int(layer.get("head_dim") or d // heads), mlp_dim=int(layer["intermediate_size"]),
        aux_layers=tuple(aux_layers), norm_before_residual=norm_before_residual, fc_bias=fc_bias,
        own_embeddings=own_embeddings, rope_theta=float(layer.get("rope_theta", 10000.0)),
        rope_scaling=layer.get("rope_scaling"), rms_eps=float(layer.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(layer.get("max_position_embeddings", 2048)), speculative_tokens=speculative_tokens,
        dtype=dtype,
    )


def read_eagle3_config(directory: str | os.PathLike, target: ModelConfig | None = None,
                       dtype: str | None = None) -> tuple[Eagle3Config, str]:
    """(config, format) of a head folder; ``target`` resolves default layer ids and is checked."""
    d = Path(directory)
    cfg = read_json(d / "config.json")
    fmt = detect_format(d)
    files = SafetensorsFiles(d)
    names = set(files.names)
    dtype = dtype or (target.dtype if target is not None else "float32")
    where = f"{d / 'config.json'}"
    if fmt == "speculators":
        _refuse_unknown(where, cfg, _SPECULATORS_FIELDS)
        if cfg["speculators_model_type"] != "eagle3":
            raise ConfigError(f"{where}: speculators_model_type {cfg['speculators_model_type']!r} is not eagle3")
        if "norm_before_residual" not in cfg:
            raise ConfigError(f"{where}: norm_before_residual is missing (vLLM and speculators default it "
                              "differently; refusing to guess)")
        layer = cfg.get("transformer_layer_config")
        if not isinstance(layer, dict):
            raise ConfigError(f"{where}: transformer_layer_config must be an object")
        _refuse_unknown(f"{where} transformer_layer_config", layer, _LAYER_FIELDS)
        spec = cfg.get("speculators_config") or {}
        methods = spec.get("proposal_methods") or [{}]
        k = methods[0].get("speculative_tokens")
        ids = cfg.get("eagle_aux_hidden_state_layer_ids")
        aux = [int(i) for i in ids] if ids else None
        nbr = bool(cfg["norm_before_residual"])
        vocab_field = layer.get("vocab_size")
    else:
        _refuse_unknown(where, cfg, _LAYER_FIELDS | _EAGLE_FIELDS)
        layer = cfg
        eagle = cfg.get("eagle_config") or {}
        _refuse_unknown(f"{where} eagle_config", eagle, _EAGLE_CONFIG_FIELDS)
        if eagle.get("use_aux_hidden_state", True) is False:
            raise ConfigError(f"{where}: eagle_config.use_aux_hidden_state=false (an EAGLE-1/2 head) is not supported")
        ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        aux = [int(i) + 1 for i in ids] if ids else None  # layer outputs -> inputs of the next layer
        nbr = False
        k = None
        if bool(cfg.get("bias")) != ("fc.bias" in names):
            state = "absent" if cfg.get("bias") else "present"
            raise ConfigError(f"{where}: bias={cfg.get('bias')} but fc.bias is {state}")
        vocab_field = cfg.get("vocab_size")
    if aux is None:
        if target is None:
            raise ConfigError(f"{where} names no aux layer ids: the target's layer count is needed for the default")
        aux = list(default_aux_layers(target.num_layers))
    vocab = target.vocab_size if target is not None else vocab_field
    if target is not None and vocab_field is not None and int(vocab_field) != target.vocab_size:
        raise ConfigError(f"{where}: vocab_size {vocab_field} differs from the target's {target.vocab_size}")
    head_cfg = _layer_config(
        where, layer, name=d.name, vocab=vocab, draft_vocab=cfg.get("draft_vocab_size"),
        target_hidden=cfg.get("target_hidden_size"), aux_layers=aux, norm_before_residual=nbr,
        fc_bias="fc.bias" in names, own_embeddings="embed_tokens.weight" in names, speculative_tokens=k,
        dtype=dtype)
    files.close()
    if target is not None:
        check_head_for_target(head_cfg, target)
    return head_cfg, fmt


def check_head_for_target(cfg: Eagle3Config, target: ModelConfig) -> None:
    """A head fits a target: same vocabulary, features of the target's width, layers it has."""
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"EAGLE-3 head {cfg.name} has vocab_size {cfg.vocab_size}, the target {target.vocab_size}")
    if cfg.target_hidden_size != target.d_model:
        raise ValueError(f"EAGLE-3 head {cfg.name} reads features of width {cfg.target_hidden_size}, the target "
                         f"{target.name} has d_model {target.d_model}")
    bad = [i for i in cfg.aux_layers if not 0 <= i <= target.num_layers]
    if bad:
        raise ValueError(f"EAGLE-3 head {cfg.name}: aux layer ids {bad} do not exist in the {target.num_layers}-layer "
                         f"target {target.name} (ids 0..{target.num_layers})")
    if not cfg.own_embeddings and cfg.hidden_size != target.d_model:
        raise ValueError(f"EAGLE-3 head {cfg.name} (D {cfg.hidden_size}) has no embeddings of its own and cannot "
                         f"share the target's (d_model {target.d_model})")


def _convert(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "vector" or kind == "index":
        return x
    if kind == "linear":  # [out, in] -> [in, out]
        return x.T
    if kind == "qkv":  # [N*Dh, 2D] -> [2D, N, Dh]
        return x.T.reshape(shape)
    if kind == "o":  # [D, H*Dh] -> [H, Dh, D]
        return x.T.reshape(shape)
    raise AssertionError(kind)


def _unconvert(kind: str, x: np.ndarray) -> np.ndarray:
    if kind in ("vector", "index"):
        return x
    if kind == "linear":
        return x.T
    if kind == "qkv":  # [2D, N, Dh] -> [N*Dh, 2D]
        return x.reshape(x.shape[0], -1).T
    if kind == "o":  # [H, Dh, D] -> [D, H*Dh]
        return x.reshape(-1, x.shape[-1]).T
    raise AssertionError(kind)


def _tensor_map(fmt: str) -> dict[str, tuple[tuple[str, ...], str]]:
    prefix = _LAYER_PREFIX[fmt]
    return {**_TOP_TENSORS, **{prefix + k: v for k, v in _LAYER_TENSORS.items()}}


def _variable(head: Eagle3Head, path: tuple[str, ...]):
    obj = head
    for p in path:
        obj = getattr(obj, p)
    return obj


def load_eagle3(directory: str | os.PathLike, target: ModelConfig | None = None, dtype: str | None = None
                ) -> Eagle3Head:
    """An EAGLE-3 head from a folder in either layout (``config.json`` + safetensors)."""
    d = Path(directory)
    cfg, fmt = read_eagle3_config(d, target, dtype)
    head = nnx.eval_shape(lambda: Eagle3Head(cfg, nnx.Rngs(params=0)))
    mapping = _tensor_map(fmt)
    with SafetensorsFiles(d) as files:
        names = set(files.names)
        unknown = sorted(n for n in names if n not in mapping and n != "t2d")
        if unknown:
            raise CheckpointError(f"{d}: tensor(s) {', '.join(unknown[:8])} are not part of an EAGLE-3 head jaxspec "
                                  "implements")
        absent = {("fc_bias",)} if not cfg.fc_bias else set()
        absent |= {("embed",)} if not cfg.own_embeddings else set()
        wanted = [n for n, (path, _) in mapping.items() if path not in absent and path != ("d2t",)]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise CheckpointError(f"{d}: missing tensor(s) {', '.join(missing)}")
        np_dtype = jnp.dtype(cfg.dtype)
        for name in wanted:
            path, kind = mapping[name]
            var = _variable(head, path)
            shape = tuple(var.get_value().shape)
            x = _convert(kind, files.read(name), shape)
            if tuple(x.shape) != shape:
                raise CheckpointError(f"{d}: {name} has shape {files.shape(name)}, expected one giving {shape}")
            var.set_value(jnp.asarray(np.asarray(x, np.float32).astype(np_dtype)))
        if "d2t" in names:
            d2t = np.asarray(files.read("d2t")).astype(np.int64)
        elif cfg.draft_vocab_size == cfg.vocab_size:
            d2t = np.zeros(cfg.draft_vocab_size, np.int64)
        else:
            raise CheckpointError(f"{d}: draft_vocab_size {cfg.draft_vocab_size} < vocab_size {cfg.vocab_size} "
                                  "but there is no d2t")
        ids = check_d2t(d2t, cfg)
        if "t2d" in names:
            t2d = np.asarray(files.read("t2d")).astype(bool)
            expect = np.zeros(cfg.vocab_size, bool)
            expect[ids] = True
            if t2d.shape != expect.shape or not np.array_equal(t2d, expect):
                raise CheckpointError(f"{d}: t2d does not mark exactly the target ids d2t maps to")
        head.d2t.set_value(jnp.asarray(d2t, jnp.int32))
    return head


def check_d2t(d2t: np.ndarray, cfg: Eagle3Config) -> np.ndarray:
    """The target ids (draft id + d2t) -> [draft_vocab]; they must be distinct and in range."""
    if d2t.shape != (cfg.draft_vocab_size,):
        raise CheckpointError(f"d2t has shape {d2t.shape}, expected ({cfg.draft_vocab_size},)")
    ids = np.arange(cfg.draft_vocab_size) + d2t
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= cfg.vocab_size or len(np.unique(ids)) != len(ids):
        raise CheckpointError("d2t maps draft ids to target ids that are out of range or repeated")
    return ids


def save_eagle3(directory: str | os.PathLike, head: Eagle3Head, verifier: str = "", fmt: str = "speculators") -> Path:
    """Write ``head`` as a speculators-layout folder (``fmt="eagle"`` writes the original layout,
    for tests and tools that need it)."""
    from safetensors.numpy import save_file

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    cfg = head.cfg
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (path, kind) in _tensor_map(fmt).items():
        if (path == ("fc_bias",) and not cfg.fc_bias) or (path == ("embed",) and not cfg.own_embeddings):
            continue
        x = np.asarray(_variable(head, path).get_value())
        tensors[name] = np.ascontiguousarray(_unconvert(kind, x.astype(np.int64) if kind == "index" else x))
    ids = np.arange(cfg.draft_vocab_size) + np.asarray(head.d2t.get_value())
    t2d = np.zeros(cfg.vocab_size, bool)
    t2d[ids] = True
    tensors["t2d"] = t2d
    save_file(tensors, str(d / "model.safetensors"))
    layer = {
        "model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.mlp_dim,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_hidden_layers": 1, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    }
    if fmt == "speculators":
        config = {
            "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            "transformer_layer_config": layer, "draft_vocab_size": cfg.draft_vocab_size,
            "norm_before_residual": cfg.norm_before_residual, "target_hidden_size": cfg.target_hidden_size,
            "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layers),
            "speculators_config": {
                "algorithm": "eagle3", "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": cfg.speculative_tokens or 3}],
                "verifier": {"name_or_path": verifier, "architectures": []},
            },
            "torch_dtype": cfg.dtype,
        }
    else:
        if cfg.norm_before_residual:
            raise ValueError("the original EAGLE layout has no norm_before_residual field")
        config = {**layer, "architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": cfg.draft_vocab_size,
                  "target_hidden_size": cfg.target_hidden_size, "torch_dtype": cfg.dtype,
                  "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in cfg.aux_layers],
                                   "use_aux_hidden_state": True}}
        if cfg.fc_bias:
            config["bias"] = True  # SGLang's switch for fc's bias
    with open(d / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    return d
