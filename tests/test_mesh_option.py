"""``--mesh`` for serve and generate: a named mesh places the engine (and its draft) on the
devices present; a mesh for other hardware, too many devices or an unknown name is refused
before any weight is loaded, with a message naming the problem."""

import jax
import pytest

from jaxspec import generate
from jaxspec.config import ConfigError
from jaxspec.mesh import AUTO_MESH, MeshConfigError, mesh_for_option
from jaxspec.sampling import SamplingParams
from jaxspec.serve import options_from_args, parse_args
from serving.build import EngineOptions, load_engine


def test_auto_on_virtual_cpu_devices_is_one_device():
    assert len(jax.devices()) == 8
    assert mesh_for_option(AUTO_MESH) is None
    assert mesh_for_option(None) is None
    assert mesh_for_option("cpu-8").num_devices == 8


@pytest.mark.parametrize("name,message", [
    ("tpu-v5e-8", "is for tpu devices; this host has cpu"),
    ("no-such-mesh", "no-such-mesh"),
])
def test_bad_mesh_is_refused_before_loading(name, message):
    with pytest.raises(MeshConfigError, match=message):
        mesh_for_option(name)
    with pytest.raises(ConfigError, match=message):
        options_from_args(parse_args(["--model", "tiny-moe", "--mesh", name]))
    assert generate.main(["--model", "tiny-moe", "--mesh", name, "hi"]) == 2


def test_serving_engine_on_a_named_mesh_matches_one_device():
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs, descriptions = [], []
    for mesh in (None, "cpu-8"):
        opts = EngineOptions(model="tiny-moe", draft="tiny-dense", spec_method="draft", slots=4, max_len=64, mesh=mesh)
        bundle = load_engine(opts)
        outs.append([c.token_ids for c in bundle.engine.generate(["def f(x):", "import os"], params)])
        descriptions.append(bundle.description)
    assert outs[0] == outs[1]
    assert descriptions[0].mesh_shape in ({}, {"data": 1, "expert": 1, "tensor": 1})
    assert descriptions[1].mesh_shape == {"data": 2, "expert": 2, "tensor": 2}
