"""The model through the Triton kernels (CPU interpreter) equals the model through the references.

Runs in a subprocess: Triton chooses interpreter vs compiled when the kernel modules are imported,
so TRITON_INTERPRET=1 must be set before that, without leaking into this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, torch
from af_train.config import Recipe
from af_train.objectives import build_training_module

torch.manual_seed(0)
recipe = Recipe.from_dict({"model": {"preset": "tiny", "hidden_dropout_prob": 0.0},
                           "data": {"code_rows": [0, 1], "max_length": 12},
                           "objective": {"mode": "pretrain", "joint_rows": True, "mpc_weight": 0.5}})
module = build_training_module(recipe, 0, False)
gen = torch.Generator().manual_seed(1)
ids = torch.randint(0, 1024, (3, 2, 12), generator=gen)
mask = torch.ones(3, 12, dtype=torch.long)
mask[1, 7:] = 0
labels = torch.where(torch.rand(3, 2, 12, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
labels[..., 7:] = torch.where(mask[:, None, 7:] == 1, labels[..., 7:], -100)
batch = {"input_ids": ids, "attention_mask": mask, "mlm_labels": labels}
result = {}
for backend in ("reference", "triton"):
    module.encoder.kernels = backend  # the attention and the MPC loss follow the encoder's backend
    module.zero_grad(set_to_none=True)
    out = module(batch)
    out["loss"].backward()
    grads = torch.cat([p.grad.flatten() for p in module.parameters()])
    result[backend] = {"loss": out["loss"].item(), "mpc": out["logs"]["mpc_loss"].item(), "grads": grads}
diff = (result["triton"]["grads"] - result["reference"]["grads"]).abs().max().item()
scale = result["reference"]["grads"].abs().max().item()
print(json.dumps({"loss": [result[b]["loss"] for b in result], "mpc": [result[b]["mpc"] for b in result],
                  "grad_diff": diff, "grad_scale": scale}))
"""


def test_triton_kernels_through_the_model_match_reference():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (ref_loss, tri_loss), (ref_mpc, tri_mpc) = result["loss"], result["mpc"]
    assert abs(ref_loss - tri_loss) < 1e-4 * abs(ref_loss)
    assert abs(ref_mpc - tri_mpc) < 1e-4 * abs(ref_mpc)
    assert result["grad_scale"] > 0 and result["grad_diff"] < 1e-4 * result["grad_scale"]


DROPOUT_SCRIPT = r"""
import json, torch
from af_train.model import AudioFormerConfig, RoFormerEncoder
import kernels.rotary_attention as triton_attention

seeds = []
draw = triton_attention.draw_dropout_seed
triton_attention.draw_dropout_seed = lambda device: seeds.append(1) or draw(device)
torch.manual_seed(0)
config = AudioFormerConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1)
encoder = RoFormerEncoder(config)
with torch.no_grad():
    for p in encoder.parameters():
        p.add_(0.05 * torch.randn_like(p))
gen = torch.Generator().manual_seed(1)
ids = torch.randint(0, 1024, (2, 11), generator=gen)
mask = torch.ones(2, 11, dtype=torch.long)
mask[1, 6:] = 0
weights = torch.linspace(-1, 1, 64)

def run(seed, checkpointing):
    encoder.train()
    encoder.activation_checkpointing = checkpointing
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = (encoder(ids, mask) * weights).sum()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in encoder.parameters()])

encoder.kernels = "triton"
plain_loss, plain = run(5, False)
draws_plain = len(seeds)
ckpt_loss, ckpt = run(5, True)
other_loss, other = run(6, False)
encoder.eval()
with torch.no_grad():
    eval_triton = encoder(ids, mask)
    encoder.kernels = "reference"
    eval_reference = encoder(ids, mask)
print(json.dumps({"loss": [plain_loss, ckpt_loss, other_loss], "draws_plain": draws_plain,
                  "draws_total": len(seeds), "grad_diff": (ckpt - plain).abs().max().item(),
                  "grad_scale": plain.abs().max().item(), "other_diff": (other - plain).abs().max().item(),
                  "eval_diff": (eval_triton - eval_reference).abs().max().item()}))
"""


def test_triton_attention_dropout_under_activation_checkpointing():
    """Triton path (interpreter): checkpoint recomputation redraws the same in-kernel dropout masks."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", DROPOUT_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    plain_loss, ckpt_loss, other_loss = result["loss"]
    assert result["draws_plain"] == 2  # one seed per layer's attention call (2 layers), none in backward
    assert result["draws_total"] == 2 + 4 + 2  # checkpointing: forward + recomputation draw again
    assert ckpt_loss == plain_loss
    assert result["grad_scale"] > 0 and result["grad_diff"] <= 1e-6 * result["grad_scale"]
    assert other_loss != plain_loss and result["other_diff"] > 1e-3 * result["grad_scale"]
    assert result["eval_diff"] < 1e-5  # eval mode: no dropout, the Triton path equals the reference
