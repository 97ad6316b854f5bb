"""jigsaw_ext.megatron_cpu.import_megatron_core: megatron-core imported in a fresh process without
torch's inductor (what its import-time torch.compile calls would load), torch.compile itself left
untouched, and megatron's compile decorator still compiling, on the first call."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import torch
real = torch.compile
from jigsaw_ext.megatron_cpu import import_megatron_core
import_megatron_core()
from megatron.core.fusions.fused_bias_geglu import bias_geglu
from megatron.core.jit import jit_fuser
from jigsaw_ext.mesh import MeshConfig, init_mesh
init_mesh(MeshConfig())  # imports megatron's HyperCommGrid through the same door
inductor_after_import = "torch._inductor.compile_fx" in sys.modules
double = jit_fuser(backend="eager")(lambda x: 2 * x)
out = double(torch.ones(3)).tolist()
print(json.dumps(dict(
    inductor_after_import=inductor_after_import,
    compile_restored=torch.compile is real,
    geglu_name=bias_geglu.__name__,
    compiled=out,
    dynamo_ran="torch._dynamo.eval_frame" in sys.modules,
)))
"""


def test_megatron_imports_without_inductor_and_still_compiles_on_first_call():
    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert not got["inductor_after_import"], got
    assert got["compile_restored"] and got["geglu_name"] == "bias_geglu", got
    assert got["compiled"] == [2.0, 2.0, 2.0] and got["dynamo_ran"], got
