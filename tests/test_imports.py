"""Import layering: the kernels (``pallas_kernels``, ``cpu_kernels``) never import the model package (``jaxspec``);
the model side registers the kernel adapters. Each check runs in a fresh interpreter, since
this test process has imported everything already."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import cpu_kernels
import pallas_kernels

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"--- code:\n{code}\n--- stderr:\n{r.stderr[-4000:]}"


def test_kernel_modules_import_no_jaxspec():
    modules = sorted(f"{pkg.__name__}.{m.name}" for pkg in (pallas_kernels, cpu_kernels)
                     for m in pkgutil.iter_modules(pkg.__path__))
    assert "pallas_kernels.gmm" in modules and "cpu_kernels.moe_ffn" in modules
    _run(
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    loaded = sorted(m for m in sys.modules if m == 'jaxspec' or m.startswith('jaxspec.'))\n"
        "    assert not loaded, f'{name} loaded {loaded}'\n"
    )


def test_moe_modules_import_alone_and_register_lazily():
    # moe_dispatch first: it imports neither lazy backend until asked, then each registers itself.
    _run(
        "import sys\n"
        "import jaxspec.models.moe_dispatch as md\n"
        "assert 'jaxspec.models.moe_pallas' not in sys.modules and 'pallas_kernels.gmm' not in sys.modules\n"
        "assert 'pallas' not in md.BACKENDS and 'expert_parallel' not in md.BACKENDS\n"
        "assert md.choose_backend('pallas', 4) == 'pallas' and 'pallas' in md.BACKENDS\n"
        "assert md.choose_backend('expert_parallel', 4) == 'expert_parallel'\n"
        "assert md.choose_backend('auto', 4, platform='gpu') == 'ragged'  # too few rows for the kernel\n"
        "assert md.choose_backend('auto', 4, platform='tpu') == 'ragged'  # no kernel validated there yet\n"
        "from jaxspec.models.moe_pallas import dispatch_pallas\n"
        "assert md.BACKENDS['pallas'] is dispatch_pallas\n"
        "try:\n"
        "    md.choose_backend('nope', 4)\n"
        "except ValueError as e:\n"
        "    assert 'pallas' in str(e) and 'expert_parallel' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('unknown backend accepted')\n"
    )
    # Each lazily loaded module also imports first, on its own.
    for module in ("jaxspec.models.moe_parallel", "jaxspec.models.moe_pallas"):
        _run(f"import {module}\nfrom jaxspec.models.moe_dispatch import choose_backend\n"
             "assert choose_backend('pallas', 4) == 'pallas'\n")
