"""Named device meshes: ``configs/meshes/NAME.json`` -> ``jax.sharding.Mesh`` + logical-axis rules.

A mesh config names three axes, always in the order (data, expert, tensor):

  data    replicas of the weights; cache slots (requests) are split over it
  expert  MoE experts are split over it (expert parallelism, see models/moe_parallel)
  tensor  heads, kv heads, MLP width, expert width and vocabulary are split over it

and the rules that map the model's logical axes (``jaxspec.sharding``) onto them.
A size-1 axis is harmless, so one rule set serves every mesh. The same config
builds a mesh from the devices present (serving, tests) or from an ahead-of-time
topology's devices (compiling for TPU / H100 on a CPU host, see ``topology_devices``).

``Placement`` bundles a mesh with its rules in a hashable form, so it can be a
static argument of jitted steps; ``check_placement`` refuses layouts that cannot
work (experts that do not split evenly) with the numbers in the message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxspec.config import ModelConfig, config_dir
from jaxspec.models.kv_cache import KVCache
from jaxspec.sharding import Rules, cache_shardings, logical_to_spec, state_shardings

MESH_AXES = ("data", "expert", "tensor")
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "moe_mlp", "expert", "layers", "slots", "seq")

_NONE = {name: None for name in LOGICAL_AXES}
# Named rule sets over (data, expert, tensor). Slots always go over data.
TP_RULES: dict[str, Any] = {**_NONE, "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
                            "moe_mlp": "tensor", "slots": "data"}
EP_RULES: dict[str, Any] = {**_NONE, "expert": "expert", "slots": "data"}
EP_TP_RULES: dict[str, Any] = {**TP_RULES, "expert": "expert"}
REPLICATED_RULES: dict[str, Any] = {**_NONE, "slots": "data"}
RULE_SETS = {"tp": TP_RULES, "ep": EP_RULES, "ep_tp": EP_TP_RULES, "replicated": REPLICATED_RULES}


# How expert parallelism may move tokens (jaxspec.models.moe_parallel); here so a config validates
# without importing the models.
MOE_EXCHANGES = ("psum", "ragged_all_to_all")


class MeshConfigError(ValueError):
    """A mesh config is missing, malformed, or does not fit the devices or the model."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    name: str
    platform: str  # "cpu" | "tpu" | "gpu"
    axes: dict[str, int]  # data / expert / tensor -> size
    rules: dict[str, Any]
    description: str = ""
    hbm_bytes_per_device: int | None = None  # device memory, for planning (None: unknown, e.g. CPU)
    topology: dict[str, Any] | None = None  # how to describe the target ahead of time (see topology_devices)
    moe_exchange: str = "psum"  # how expert parallelism moves tokens (jaxspec.models.moe_parallel.EXCHANGES)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.axes[a] for a in MESH_AXES)

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    def validate(self) -> None:
        if tuple(self.axes) != MESH_AXES:
            raise MeshConfigError(f"mesh {self.name}: axes must be {MESH_AXES} in that order, got {tuple(self.axes)}")
        if any(int(s) < 1 for s in self.axes.values()):
            raise MeshConfigError(f"mesh {self.name}: axis sizes must be >= 1, got {self.axes}")
        validate_rules(self.rules, self.name)
        if self.platform not in ("cpu", "tpu", "gpu"):
            raise MeshConfigError(f"mesh {self.name}: platform must be cpu, tpu or gpu, got {self.platform!r}")
        if self.moe_exchange not in MOE_EXCHANGES:
            raise MeshConfigError(f"mesh {self.name}: moe_exchange must be one of {MOE_EXCHANGES}, "
                                  f"got {self.moe_exchange!r}")


def validate_rules(rules: Rules, where: str = "rules") -> None:
    unknown = sorted(set(rules) - set(LOGICAL_AXES))
    if unknown:
        raise MeshConfigError(f"{where}: unknown logical axes {unknown}; known: {', '.join(LOGICAL_AXES)}")
    for logical, target in rules.items():
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise MeshConfigError(f"{where}: {logical!r} maps to unknown mesh axes {bad}; mesh axes: {MESH_AXES}")


def mesh_config_dir() -> Path:
    return config_dir() / "meshes"


def available_mesh_configs() -> list[str]:
    return sorted(p.stem for p in mesh_config_dir().glob("*.json"))


def load_mesh_config(name_or_path: str | os.PathLike) -> MeshConfig:
    """A mesh config by name (``configs/meshes/NAME.json``) or from a JSON path."""
    path = Path(name_or_path)
    if path.suffix != ".json" or not path.exists():
        path = mesh_config_dir() / f"{name_or_path}.json"
        if not path.exists():
            raise MeshConfigError(
                f"unknown mesh config {str(name_or_path)!r}; available: {', '.join(available_mesh_configs())}"
            )
    data = json.loads(path.read_text())
    rules = data.get("rules", "ep_tp")
    if isinstance(rules, str):  # a named rule set
        if rules not in RULE_SETS:
            raise MeshConfigError(f"mesh {path.stem}: unknown rule set {rules!r}; known: {', '.join(RULE_SETS)}")
        rules = RULE_SETS[rules]
    cfg = MeshConfig(
        name=data.get("name", path.stem), platform=data["platform"], axes={a: int(data["axes"][a]) for a in data["axes"]},
        rules={**_NONE, **rules}, description=data.get("description", ""),
        hbm_bytes_per_device=data.get("hbm_bytes_per_device"), topology=data.get("topology"),
        moe_exchange=data.get("moe_exchange", "psum"),
    )
    cfg.validate()
    return cfg


def target_config_text(name: str) -> str:
    """A ``GpuTargetConfigProto`` text file from ``configs/targets/NAME.textproto`` (comments stripped)."""
    path = config_dir() / "targets" / f"{name}.textproto"
    if not path.exists():
        raise MeshConfigError(f"no GPU target description {path}")
    lines = [line.split("#", 1)[0].rstrip() for line in path.read_text().splitlines()]
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------- meshes
def _arrange(devices: Sequence[jax.Device], shape: tuple[int, ...]) -> np.ndarray:
    """Devices in mesh order. On TPU the physical torus decides which chips neighbour each
    other, so let mesh_utils place the innermost (tensor) axis on the closest chips."""
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        try:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # an unusual slice shape: plain order is still correct, just less local
    return np.asarray(devices, dtype=object).reshape(shape)


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, expert, tensor) mesh over ``devices`` (default: ``jax.devices()``; the first
    ``cfg.num_devices`` are used). Too few devices is an error naming both counts."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < cfg.num_devices:
        raise MeshConfigError(
            f"mesh {cfg.name} {cfg.axes} needs {cfg.num_devices} devices, {len(devices)} available"
        )
    return Mesh(_arrange(devices[: cfg.num_devices], cfg.shape), MESH_AXES)


def topology_devices(cfg: MeshConfig) -> list[jax.Device]:
    """Devices of the target described by ``cfg.topology``, for ahead-of-time compilation on
    any host (needs the platform's compiler plugin: libtpu, or jax-cuda12-plugin + ptxas)."""
    if not cfg.topology:
        raise MeshConfigError(f"mesh {cfg.name} has no topology to compile for ahead of time")
    from jax.experimental import topologies

    topo = cfg.topology
    if cfg.platform == "tpu":
        # Describing a topology never touches a chip, so another process holding libtpu's
        # lock file (a concurrent compile or test) is no reason to fail.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo["name"], chip_config_name=topo.get("chip_config_name", "default"),
            chips_per_host_bounds=tuple(topo["chips_per_host_bounds"]), num_slices=topo.get("num_slices", 1),
        )
    elif cfg.platform == "gpu":
        _prefer_pip_ptxas()
        desc = topologies.get_topology_desc(
            platform="cuda", topology=topo["name"], target_config=target_config_text(topo["target_config"])
        )
    else:
        raise MeshConfigError(f"mesh {cfg.name}: no ahead-of-time topology for platform {cfg.platform}")
    return list(desc.devices)


def _prefer_pip_ptxas() -> None:
    """Put pip's CUDA 12 ptxas / libdevice (nvidia-cuda-nvcc-cu12) first on PATH: a system ptxas of
    another CUDA major version may build code a CUDA 12 driver cannot load."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        bin_dir = Path(root) / "cuda_nvcc" / "bin"
        if (bin_dir / "ptxas").exists():
            path = os.environ.get("PATH", "")
            if not path.startswith(str(bin_dir)):
                os.environ["PATH"] = f"{bin_dir}{os.pathsep}{path}"
            return


def default_mesh_config(devices: Sequence[jax.Device] | None = None) -> MeshConfig:
    """A sensible mesh for the devices present: the shipped config for a known machine,
    else pure tensor parallelism over all devices (valid for any model whose head counts divide)."""
    devices = list(jax.devices() if devices is None else devices)
    n, platform = len(devices), devices[0].platform
    kind = getattr(devices[0], "device_kind", "").lower()
    known = {
        ("tpu", 8, "lite"): "tpu-v5e-8", ("tpu", 4, "lite"): "tpu-v5e-4", ("tpu", 4, "v5"): "tpu-v5p-8",
        ("gpu", 8, "h100"): "gpu-8xh100", ("gpu", 1, "h100"): "gpu-1xh100", ("cpu", 8, ""): "cpu-8",
    }
    plat = "gpu" if platform in ("gpu", "cuda") else platform
    for (p, count, tag), name in known.items():
        if p == plat and count == n and tag in kind:
            return load_mesh_config(name)
    return MeshConfig(
        name=f"{plat}-{n}", platform=plat if plat in ("cpu", "tpu", "gpu") else "cpu",
        axes={"data": 1, "expert": 1, "tensor": n}, rules=dict(EP_TP_RULES),
        description=f"default for {n} {platform} device(s): tensor parallelism only",
    )


AUTO_MESH = "auto"


def mesh_for_option(value: str | None, devices: Sequence[jax.Device] | None = None) -> MeshConfig | None:
    """What ``--mesh`` means: None -> one device; "auto" -> ``default_mesh_config`` when several
    accelerators are present (one device, or virtual CPU devices: one device); else a mesh
    config name or path, checked against the devices present."""
    if value is None:
        return None
    devices = list(jax.devices() if devices is None else devices)
    if value == AUTO_MESH:
        if len(devices) < 2 or devices[0].platform == "cpu":
            return None
        return default_mesh_config(devices)
    cfg = load_mesh_config(value)
    platform = "gpu" if devices[0].platform in ("gpu", "cuda", "rocm") else devices[0].platform
    if cfg.platform != platform:
        raise MeshConfigError(f"mesh {cfg.name} is for {cfg.platform} devices; this host has {platform} devices "
                              f"(available meshes: {', '.join(available_mesh_configs())})")
    build_mesh(cfg, devices)  # too few devices: a clear error now, before loading weights
    return cfg


def placement_for_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> "Placement":
    return Placement.create(build_mesh(cfg, devices), cfg.rules, cfg.moe_exchange)


# ------------------------------------------------------------------------- placement
def _freeze(rules: Rules) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and its logical-axis rules, hashable (usable as a static jit argument)."""

    mesh: Mesh
    frozen_rules: tuple[tuple[str, Any], ...]
    moe_exchange: str = "psum"  # expert parallelism's token exchange (MeshConfig.moe_exchange)

    @classmethod
    def create(cls, mesh: Mesh, rules: Rules, moe_exchange: str = "psum") -> "Placement":
        validate_rules(rules)
        if moe_exchange not in MOE_EXCHANGES:
            raise MeshConfigError(f"moe_exchange must be one of {MOE_EXCHANGES}, got {moe_exchange!r}")
        return cls(mesh, _freeze(rules), moe_exchange)

    @cached_property
    def rules(self) -> dict[str, Any]:
        return dict(self.frozen_rules)

    def axis_size(self, logical: str) -> int:
        """How many ways ``logical`` is split (product of the mesh axes it maps to)."""
        target = self.rules.get(logical)
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        return math.prod(self.mesh.shape[t] for t in targets)

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        target = self.rules.get(logical)
        return (target,) if isinstance(target, str) else tuple(target or ())

    def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        return logical_to_spec(axes, self.rules, self.mesh, shape)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def state_shardings(self, state: nnx.State) -> nnx.State:
        return state_shardings(state, self.mesh, self.rules)

    def cache_shardings(self, cache: KVCache) -> KVCache:
        return cache_shardings(cache, self.mesh, self.rules)


def check_placement(cfg: ModelConfig, placement: Placement) -> None:
    """Refuse layouts that cannot work, naming the numbers. Experts must split evenly over the
    expert axis: expert parallelism gives every device the same number of whole experts."""
    ep = placement.axis_size("expert")
    if cfg.is_moe and ep > 1 and cfg.num_experts % ep:
        raise MeshConfigError(
            f"{cfg.name}: {cfg.num_experts} experts cannot be split evenly over an expert axis of size {ep} "
            f"({cfg.num_experts} / {ep} = {cfg.num_experts / ep:.2f} experts per device); "
            f"use an expert axis size that divides {cfg.num_experts}"
        )
    tp = placement.axis_size("moe_mlp")
    if cfg.is_moe and tp > 1 and cfg.moe_mlp_dim % tp:
        raise MeshConfigError(
            f"{cfg.name}: expert width moe_mlp_dim={cfg.moe_mlp_dim} cannot be split over a tensor axis of size {tp}"
        )


def param_bytes(cfg: ModelConfig) -> int:
    import jax.numpy as jnp

    return cfg.param_counts()["total"] * jnp.dtype(cfg.dtype).itemsize


# A draft this small is cheaper to replicate (no collectives in its k sequential steps) than to
# shard: weights plus its cache as each device would hold them, at most this many bytes when the
# device memory is unknown (CPU), else at most this fraction of it.
DRAFT_REPLICATE_MAX_BYTES = 2 << 30
DRAFT_REPLICATE_MAX_FRACTION = 0.10


def device_memory_bytes(device: jax.Device) -> int | None:
    """A device's memory from the runtime (None where it reports none: CPU, topology devices)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (not every backend implements memory_stats)
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def draft_placement(draft_cfg: ModelConfig, target: Placement, num_slots: int = 0, max_len: int = 0,
                    hbm_bytes: int | None = None, max_replicated_bytes: int | None = None,
                    kv_dtype: str | None = None) -> Placement:
    """The draft model's placement: replicated weights when the draft is small (its k draft steps
    then run without any collective), else the target's rules. Small means its weights plus its
    KV cache for ``num_slots`` x ``max_len`` (slots split over the data axes either way), as each
    device would hold them replicated, take at most ``max_replicated_bytes`` (default: 10% of
    ``hbm_bytes`` when known, else 2 GiB): a 0.6B draft with a 4096-token cache for 8 slots is
    4.6 GiB, too much to copy onto every 16 GiB v5e chip, and nothing on an 80 GiB H100."""
    if max_replicated_bytes is None:
        max_replicated_bytes = (DRAFT_REPLICATE_MAX_BYTES if hbm_bytes is None
                                else int(DRAFT_REPLICATE_MAX_FRACTION * hbm_bytes))
    replicated = Placement.create(target.mesh, {**REPLICATED_RULES, "slots": target.rules.get("slots")})
    cache_bytes = 0
    if num_slots and max_len:
        cache = KVCache.abstract(draft_cfg, num_slots, max_len, kv_dtype=kv_dtype)
        cache_bytes = cache.nbytes() // replicated.axis_size("slots")
    if param_bytes(draft_cfg) + cache_bytes <= max_replicated_bytes:
        return replicated
    return target
