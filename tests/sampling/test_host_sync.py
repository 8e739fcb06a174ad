"""Hot loops without host round trips, counted on CPU with a dispatch mode
(``duo_fast.core.hostsync``): the sampling loop (every sampler variant, PyTorch and Triton under the
interpreter, which is the code a GPU and its CUDA-graph capture run), the training step, and
the training loop between log steps. A second test reads the hot modules' source and fails when
one of them grows a host read outside the places allowed for it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from duo_fast.core.hostsync import HostSyncCounter
from duo_fast.model import DiT, DiTConfig
from duo_fast.sampling import SamplerConfig, generate
from duo_fast.sampling.psi import PSI_PRESETS

ROOT = Path(__file__).resolve().parents[2]

SAMPLERS = {
    "greedy": dict(),
    "ancestral": dict(noise_removal="ancestral"),
    "none": dict(noise_removal="none"),
    "psi": dict(kappa=(0.2, 0.9), noise_removal="ancestral"),
    "nucleus": dict(top_p=0.9, fused=False),
    "nucleus-fused": dict(top_p=0.9),
    "unfused": dict(fused=False),
    "psi-preset": dict(psi=PSI_PRESETS["duo-loop-remdm"]["psi"], top_p=0.95, noise_removal="ancestral"),
    "prompt": dict(),
    "infill": dict(noise_removal="ancestral"),
}
CONDITIONING = {
    "prompt": dict(prefix=torch.tensor([5, 6, 7])),
    "infill": dict(prefix=torch.tensor([1, 0, 0, 4]), known_mask=torch.tensor([True, False, False, True])),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", sorted(SAMPLERS))
def test_sampling_loop_has_no_host_round_trips(monkeypatch, impl, variant):
    monkeypatch.setenv("DUO_FAST_IMPL", impl)
    model = DiT(DiTConfig.from_name("tiny", vocab_size=97, model_length=24))
    with torch.no_grad():                       # a non-trivial output layer (it is zero at initialisation)
        model.output_layer.linear.weight.normal_(0, 0.5)
    for steps in (1, 5):
        with HostSyncCounter() as c:
            ids, stats = generate(model, SamplerConfig(steps=steps, batch=3, length=24, **SAMPLERS[variant]),
                                  progress=False, **CONDITIONING.get(variant, {}))
        assert c.total == 0, f"{variant}/{impl}, {steps} steps: {dict(c.counts)}\n" + "\n".join(c.where[:6])
        assert ids.shape == (3, 24) and stats["wall_seconds"] >= stats["loop_seconds"] > 0


def _trainer(tmp_path: Path, **kw):
    from duo_fast.training.duo import TrainConfig, Trainer

    base = dict(model="tiny", tokenizer_vocab=300, length=32, batch_size=4, micro_batch_size=2, steps=10,
                curriculum_end=4, ema=0.99, out=str(tmp_path / "run"), progress=False, log_every=1, check_every=0,
                warmup_steps=2, dropout=0.1, val_batches=1)
    base.update(kw)
    return TrainConfig(**base), Trainer(TrainConfig(**base))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_training_step_has_no_host_round_trips(tmp_path, monkeypatch, impl):
    """Both phases, gradient accumulation, clipping, fused AdamW, the EMA and batch staging."""
    monkeypatch.setenv("DUO_FAST_IMPL", impl)
    _, tr = _trainer(tmp_path)
    for step in range(6):                       # steps 0-3 curriculum, 4-5 discrete
        with HostSyncCounter() as c:
            loss, skipped, sums = tr.train_step(step)
        assert c.total == 0, f"step {step}: {dict(c.counts)}\n" + "\n".join(c.where[:6])
        assert loss.dim() == 0 and skipped.dtype == torch.bool and len(sums) == 2
    assert torch.isfinite(loss) and not bool(skipped)


@pytest.mark.parametrize("curriculum", [True, False])
def test_training_loop_reads_only_at_log_steps(tmp_path, curriculum):
    """``train()`` with the same log steps (the first and the last) over 4 and over 9 steps:
    the extra 5 steps add no host round trip at all, in the curriculum or the discrete phase."""
    from duo_fast.training.duo import TrainConfig, train

    counts = []
    for steps in (4, 9):
        cfg = TrainConfig(model="tiny", tokenizer_vocab=300, length=32, batch_size=4, micro_batch_size=2,
                          steps=steps, curriculum_end=100 if curriculum else 0, ema=0.9, log_every=100,
                          check_every=0, warmup_steps=2, val_batches=1, progress=False,
                          out=str(tmp_path / f"run{steps}"))
        with HostSyncCounter() as c:
            train(cfg)
        counts.append((c.total, c.where))
    assert counts[1][0] == counts[0][0], "\n".join(w for w in counts[1][1] if w not in counts[0][1])[:3000]


def test_non_finite_step_is_skipped_on_the_device(tmp_path):
    """A NaN loss leaves weights, AdamW moments and step counts as they were, with no host read."""
    from duo_fast.training.engine import TorchEngine

    net = torch.nn.Linear(4, 3)
    eng = TorchEngine(net, lr=0.1, betas=(0.9, 0.999), weight_decay=0.0, lr_lambda=lambda k: 1.0, grad_clip=1.0, accum=1)
    x = torch.randn(5, 4)
    loss = net(x).square().mean()
    eng.backward(loss)
    eng.step(~torch.isfinite(loss.detach()))
    before = [p.detach().clone() for p in net.parameters()]
    state = {k: v.clone() for k, v in eng.opt.state[net.weight].items()}
    with HostSyncCounter() as c:
        bad = net(x).square().mean() * float("nan")
        eng.backward(bad)
        eng.step(~torch.isfinite(bad.detach()))
    assert c.total == 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.equal(state[k], eng.opt.state[net.weight][k]) for k in state)
    ok = net(x).square().mean()                 # and a finite step updates again
    eng.backward(ok)
    eng.step(~torch.isfinite(ok.detach()))
    assert not torch.equal(before[0], net.weight)
    assert float(eng.opt.state[net.weight]["step"]) == 2


def test_compiled_blocks_give_the_eager_loss(tmp_path):
    """``--compile`` (torch.compile of the denoiser blocks): the same losses as eager for 3 steps."""
    losses = []
    for compiled in (False, True):
        _, tr = _trainer(tmp_path, compile=compiled, batch_size=2, micro_batch_size=0, dropout=0.0, curriculum_end=0,
                         ema=0.0)
        x0 = tr.train_blocks[torch.arange(2)]
        losses.append([tr.step(x0, s)[0] for s in range(3)])
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-5 * abs(a), losses


# ---------------------------------------------------------------------------------------------
# The source of the hot modules: no host reads outside the places allowed for them
# ---------------------------------------------------------------------------------------------

HOT_MODULES = ["duo_fast/sampling/loop.py", "duo_fast/sampling/steps.py", "duo_fast/sampling/graph.py",
               "duo_fast/sampling/conditioning.py", "duo_fast/training/loop_support.py", "duo_fast/core/seeds.py",
               "duo_fast/training/engine.py", "duo_fast/training/harness.py", "duo_fast/training/duo.py",
               "duo_fast/training/dcd.py", "duo_fast/ops/posterior.py", "duo_fast/ops/rb_loss.py",
               "duo_fast/ops/relaxed.py", "duo_fast/ops/relaxed_torch.py", "duo_fast/ops/backends.py",
               "duo_fast/model/dit.py", "kernels/sample_posterior.py", "kernels/rb_loss.py",
               "kernels/relaxed_embedding.py"]

# (module, function): why a host read is allowed there
ALLOWED = {
    ("duo_fast/training/engine.py", "grad_norm"): "read at log steps only",
    ("duo_fast/training/engine.py", "placement"): "setup",
    ("duo_fast/training/engine.py", "world_info"): "setup",
    ("duo_fast/training/loop_support.py", "read"): "the one read per log interval",
    ("duo_fast/training/loop_support.py", "agreed_stop"): "host tensors over gloo",
    ("duo_fast/core/seeds.py", "micro_seed"): "Python ints",
    ("duo_fast/core/seeds.py", "_splitmix64"): "Python ints",
    ("duo_fast/training/duo.py", "step"): "Trainer.step reads back for tests and notebooks",
    ("duo_fast/training/duo.py", "Trainer.log_fields"): "the loop's log-step block",
    ("duo_fast/training/duo.py", "_relaxation_record"): "the loop's log-step block",
    ("duo_fast/training/duo.py", "tau_at"): "Python floats",
    ("duo_fast/training/harness.py", "nelbo"): "validation, outside the step loop",
    ("duo_fast/training/harness.py", "_Run._validate_now"): "validation, outside the step loop",
    ("duo_fast/training/harness.py", "_Run._read_interval"): "the loop's log-step block",
    ("duo_fast/training/harness.py", "_Run.finish"): "after the loop",
    ("duo_fast/training/harness.py", "Session.__init__"): "setup",
    ("duo_fast/training/harness.py", "load_checkpoint"): "resume",
    ("duo_fast/training/dcd.py", "dcd_gap"): "Python floats",
    ("duo_fast/ops/backends.py", "seed_from"): "an int seed given by the caller, or one drawn on the CPU",
    ("duo_fast/ops/backends.py", "rb_cpp_available"): "bool of the op's Python bool, cached once",
    ("duo_fast/ops/posterior.py", "sample_posterior"): "int(seed) of a caller's int seed (PyTorch path)",
    ("duo_fast/ops/posterior.py", "sample_posterior_linear"): "int(seed) of a caller's int seed (PyTorch path)",
    ("duo_fast/ops/rb_loss.py", "_finite_or_raise"): "the checked mode (log steps only)",
    ("duo_fast/ops/relaxed.py", "relaxed_embedding"): "float(tau) of the caller's Python tau",
    ("duo_fast/sampling/conditioning.py", "infill_pieces"): "int() of the template's text, parsed before the loop",
    ("duo_fast/training/loop_support.py", "BatchFeeder._stage"): "the block indices are host tensors (crc32 of them)",
    ("kernels/sample_posterior.py", "_seed_args"): "int(seed) of a caller's int seed",
    ("kernels/sample_posterior.py", "compile_calls"): "the compile check's configurations (meta tensors, no run)",
    ("kernels/rb_loss.py", "compile_calls"): "the compile check's configurations (meta tensors, no run)",
    ("kernels/relaxed_embedding.py", "compile_calls"): "the compile check's configurations (meta tensors, no run)",
    ("kernels/sample_posterior.py", "nucleus_cut_fwd"): "float(top_p) of the caller's Python top_p",
    ("duo_fast/sampling/conditioning.py", "known_positions"): "the caller's prefix checked and staged once, before "
                                                               "the loop",
}

READS = {"item", "tolist", "numpy", "cpu"}
CASTS = {"float", "int", "bool"}


def _host_reads(path: Path) -> list[tuple[str, int, str]]:
    """(function qualname, line, what) of every possible host read in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, qual: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{qual}.{child.name}" if qual else child.name)
                continue
            if isinstance(child, ast.Call):
                f = child.func
                if isinstance(f, ast.Attribute) and f.attr in READS:
                    found.append((qual, child.lineno, f".{f.attr}()"))
                elif isinstance(f, ast.Name) and f.id in CASTS and child.args and not isinstance(child.args[0], ast.Constant):
                    found.append((qual, child.lineno, f"{f.id}(...)"))
                elif (isinstance(f, ast.Attribute) and f.attr == "tensor" and isinstance(f.value, ast.Name)
                      and f.value.id == "torch"):
                    found.append((qual, child.lineno, "torch.tensor(...)"))
            visit(child, qual)

    visit(tree, "")
    return found


def _allowed(module: str, qual: str) -> bool:
    parts = qual.split(".")
    return any((module, ".".join(parts[i:j])) in ALLOWED for i in range(len(parts)) for j in range(i + 1, len(parts) + 1))


def test_hot_modules_grow_no_host_reads():
    bad = []
    for module in HOT_MODULES:
        for qual, line, what in _host_reads(ROOT / module):
            if not _allowed(module, qual):
                bad.append(f"{module}:{line} {what} in {qual or '<module>'}")
    assert not bad, "host reads in hot-loop code (move them out, or allow them in ALLOWED with a reason):\n" + "\n".join(bad)


def test_the_source_check_sees_a_planted_read(tmp_path):
    planted = tmp_path / "hot.py"
    planted.write_text("def step(x):\n    y = x * 2\n    return float(y.sum()), y.item(), torch.tensor(3.0)\n")
    assert [w for _, _, w in _host_reads(planted)] == ["float(...)", ".item()", "torch.tensor(...)"]


def test_cpu_only_reads_are_booked_apart_and_refuse_a_device_tensor():
    from duo_fast.core.hostsync import read_cpu

    t = torch.ones(3)
    with HostSyncCounter() as c:
        assert read_cpu(t.sum()) == 3.0
        float(t.sum())
    assert c.cpu_only["aten._local_scalar_dense.default"] == 1 and c.total == 1
    with pytest.raises(RuntimeError, match="CPU-only"):
        read_cpu(torch.ones(1, device="meta"))
