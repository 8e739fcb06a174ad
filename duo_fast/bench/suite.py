"""``duo-fast bench {kernels,sample,train,all}``: every case runs the plain-PyTorch
reference-style path (what the public implementation does) and ours on the same inputs in one
process, checks that they agree, and reports time, peak memory, ratios, throughput and achieved
FLOP/s and bytes/s.

Timing: the two paths alternate call by call, each at least ``repeats`` times and until both
have run ``min_seconds`` (1 s) (medians; CUDA events on GPU). Memory: peak allocated
above what existed before the call (CUDA allocator on GPU; the profiler's allocation records on
CPU). FLOPs and bytes are counted per case from the shapes (stated in each case's ``counted``)
and are the *useful* work of the operation, the same number for both paths: matmuls
``2 m n k``; memory-bound cases count one read of their large operands and one write of their
large outputs. Percentages are against the device's dense bf16 tensor-core peak and HBM
bandwidth when the device is known (H100, H200, A100), else omitted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from duo_fast import reference as ref
from duo_fast.bench.common import device_peaks, environment, peak_memory_mb, print_table, time_fn, time_pair
from duo_fast.bench.reference_paths import public_posterior_step, reference_relaxed_embedding, reference_ttable_lookup
from duo_fast.environment import environment as full_environment
from duo_fast.model import DiT, DiTConfig
from duo_fast.ops import backend, rb_loss, rb_loss_linear, relaxed_embedding, sample_posterior, sample_posterior_linear
from duo_fast.ops.relaxed import resolve_mode
from duo_fast.ops.ttable import TTable
from duo_fast.sampling.loop import SamplerConfig, generate
from duo_fast.training.duo import model_flops_per_token

__all__ = ["PRESETS", "GROUPS", "run_suite", "print_suite"]

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: the whole suite in a few minutes on two cores.
    "tiny": dict(model="tiny", batch=4, length=128, vocab=4096, steps=4, sample_batch=4, train_batch=4,
                 ttable_n=100_000),
    # The issues' GPU shapes: B*L = 32768 tokens, the GPT-2 vocabulary, the small DiT.
    "small": dict(model="small", batch=32, length=1024, vocab=50257, steps=8, sample_batch=64, train_batch=8,
                  ttable_n=10_000_000),
}
GROUPS = ("kernels", "sample", "train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Case:
    group: str
    name: str
    ref: Callable[[], Any]
    ours: Callable[[], Any]
    check: Callable[[], dict[str, Any]]           # {"ok": bool, ...details}
    flops: float = 0.0
    bytes: float = 0.0
    counted: str = ""
    items: dict[str, float] = field(default_factory=dict)   # unit -> count per call (tokens, samples, NFE)


def _draws_match_posterior(draw: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits_row: torch.Tensor,
                           a_s: float, a_t: float, n: int = 20_000) -> dict[str, Any]:
    """The timed random draw checked statistically: ``n`` draws of one token (its logits row
    repeated; a peaked row, so that many categories are tested) against the exact float64
    posterior, Pearson chi-square with categories of expected count < 5 pooled, accepted below
    ``dof + 5 sqrt(2 dof)`` (about 5 sigma)."""
    K = logits_row.numel()
    zt = logits_row.argmin().view(1, 1)                 # z_t unlikely: the draw follows x_theta, not "stay"
    exact = ref.posterior_ref(logits_row.double().softmax(-1).cpu()[None, None], zt.cpu(), a_s, a_t)[0, 0]
    got = draw(logits_row.view(1, 1, K).expand(1, n, K).contiguous(), zt.expand(1, n).contiguous())
    counts = torch.bincount(got.flatten().cpu(), minlength=K).double()
    expected = exact * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    impossible = int(counts[exact == 0].sum())
    return {"ok": stat <= dof + 5 * math.sqrt(2 * max(dof, 1)) and impossible == 0, "chi2": stat, "dof": dof,
            "draws": n}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _rule(name: str, ours: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> dict[str, Any]:
    """The flash-attention/CCE tolerance rule: our error against the float64 value at most twice
    the error of the plain PyTorch path in the same dtype, plus 2 units of rounding of the output's
    own dtype (``ours`` and ``plain`` are returned in it)."""
    e_o, e_p = _rel(ours, exact), _rel(plain, exact)
    slack = 2 * torch.finfo(ours.dtype).eps if ours.is_floating_point() else 0.0
    return {f"{name}_err": e_o, f"{name}_plain_err": e_p, f"{name}_ok": e_o <= 2 * e_p + slack}


def _all_ok(out: dict[str, Any]) -> bool:
    return all(v for k, v in out.items() if k.endswith("_ok"))


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def kernel_cases(p: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    B, L, K = p["batch"], p["length"], p["vocab"]
    D = DiTConfig.from_name(p["model"]).hidden_dim
    N = B * L
    es = torch.tensor([], dtype=dtype).element_size()
    cases: list[Case] = []

    # T-table lookup
    table = TTable.build(K)
    n = p["ttable_n"]
    gamma = torch.empty(n, dtype=torch.float64).uniform_(-5.0, -1.0, generator=g).to(device)
    p_table = (1.0 - table.q(device)).clone()
    t_ref = lambda: reference_ttable_lookup(gamma, p_table, table.gamma_min, table.gamma_max, K)   # noqa: E731
    t_ours = lambda: table.alpha_and_derivative(gamma)                                       # noqa: E731

    def t_check():
        (a0, _), (a1, d1) = t_ref(), t_ours()
        err = float((a0 - a1).abs().max())
        h = (table.gamma_max - table.gamma_min) / (p_table.shape[0] - 1)
        bound = float(d1.abs().max()) * h                 # nearest-point rounding moves gamma by <= h/2
        return {"ok": err <= bound, "max_abs_diff": err, "nearest_point_bound": bound}
    cases.append(Case("kernels", f"T lookup (n={n:,})", t_ref, t_ours, t_check, bytes=n * 8 * 3,
                      counted="read gamma, write alpha and alpha' (float64)", items={"lookups": n}))

    # RB loss from logits, forward + backward
    logits = (torch.randn(N, K, generator=g) * 2).to(device, dtype)
    x0 = torch.randint(0, K, (1, N), generator=g).to(device)
    zt = torch.where(torch.rand(1, N, generator=g).to(device) < 0.5, x0, torch.randint(0, K, (1, N), generator=g).to(device))
    a = (10 ** (-3 * torch.rand(1, N, generator=g, dtype=torch.float64))).clamp(max=1 - 1e-3).to(device)
    da = torch.full_like(a, -(1 - 1e-3))
    leaf = logits.view(1, N, K).detach().clone().requires_grad_()

    def l_ref():
        leaf.grad = None
        loss = ref.rb_loss_ref(leaf.float(), zt, x0, a, da).mean()
        loss.backward()
        return loss.detach(), leaf.grad

    def l_ours():
        leaf.grad = None
        loss = rb_loss(leaf, zt, x0, a, da).mean()
        loss.backward()
        return loss.detach(), leaf.grad

    def l_exact():
        lx = logits.view(1, N, K).double().requires_grad_()
        loss = ref.rb_loss_ref(lx, zt, x0, a, da).mean()
        loss.backward()
        return loss.detach(), lx.grad

    def l_check():
        (r, gr), (o, go), (x, gx) = [(u.clone(), v.clone()) for u, v in (l_ref(), l_ours(), l_exact())]
        out = {**_rule("loss", o, r, x), **_rule("grad", go, gr, gx)}
        return {"ok": _all_ok(out), **out}
    cases.append(Case("kernels", f"rb_loss fwd+bwd (N={N}, K={K})", l_ref, l_ours, l_check, bytes=3 * N * K * es,
                      counted="logits read twice, gradient written once", items={"tokens": N}))

    # RB loss fused with the output projection, forward + backward
    h = torch.randn(1, N, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(K, D, generator=g) * D ** -0.5).to(device).requires_grad_()
    b = (torch.randn(K, generator=g) * 0.1).to(device).requires_grad_()

    def ll_ref():
        for t in (h, w, b):
            t.grad = None
        lg = torch.nn.functional.linear(h, w.to(dtype), b.to(dtype)).float()
        loss = ref.rb_loss_ref(lg, zt, x0, a, da).mean()
        loss.backward()
        return loss.detach(), h.grad, w.grad

    def ll_ours():
        for t in (h, w, b):
            t.grad = None
        loss = rb_loss_linear(h, w, b, zt, x0, a, da).mean()
        loss.backward()
        return loss.detach(), h.grad, w.grad

    def ll_exact():
        hx, wx, bx = (t.detach().to(dtype).double().requires_grad_() for t in (h, w, b))
        loss = ref.rb_loss_ref(torch.nn.functional.linear(hx, wx, bx), zt, x0, a, da).mean()
        loss.backward()
        return loss.detach(), hx.grad, wx.grad

    def ll_check():
        r = [x.clone() for x in ll_ref()]
        o = [x.clone() for x in ll_ours()]
        x = ll_exact()
        out = {**_rule("loss", o[0], r[0], x[0]), **_rule("dh", o[1], r[1], x[1]), **_rule("dw", o[2], r[2], x[2])}
        return {"ok": _all_ok(out), **out}
    cases.append(Case("kernels", f"rb_loss_linear fwd+bwd (N={N}, K={K}, D={D})", ll_ref, ll_ours, ll_check,
                      flops=6.0 * N * K * D, counted="matmuls 2NKD forward + 4NKD backward", items={"tokens": N}))

    # relaxed embedding, forward + backward, each mode against the reference style
    xb = torch.randint(0, K, (B, L), generator=g).to(device)
    gam = (-3.5 + 1.75 * torch.rand(B, generator=g, dtype=torch.float64)).to(device)
    E = (torch.randn(K, D, generator=g) * 0.02).to(device, dtype).requires_grad_()
    dh = torch.randn(B, L, D, generator=g).to(device, dtype)
    tau = 1e-3

    def fb(fn):
        def run():
            E.grad = None
            out, z = fn()
            (out * dh).sum().backward()
            return z
        return run
    re_ref = fb(lambda: reference_relaxed_embedding(xb, gam, tau, E))
    eps = torch.randn(min(B, 2), L, K, generator=g).to(device, dtype)
    p_true = table.alpha(gam.double().cpu())
    p_true = (p_true + (1 - p_true) / K)[:, None].expand(B, L)
    mean, sd = float(p_true.sum()), math.sqrt(float((p_true * (1 - p_true)).sum()))
    for mode in ("dense", "sparse", "topk", "adaptive"):
        ours = fb((lambda m: lambda: relaxed_embedding(xb, gam, tau, E, seed=1, mode=m))(mode))

        def re_check(mode=mode, ours=ours):
            dev = abs(int((ours().cpu() == xb.cpu()).sum()) - mean) / sd
            out = {"ok": dev <= 5, "p_zt_eq_x_deviation_sd": dev}
            if mode in ("dense", "sparse"):     # with the reference's own noise: the same output
                with torch.no_grad():
                    r, zr = reference_relaxed_embedding(xb[:2], gam[:2], tau, E, eps=eps)
                    o, zo = relaxed_embedding(xb[:2], gam[:2], tau, E, mode=mode, seed=0, eps=eps)
                    x, _ = ref.relaxed_embedding_ref(xb[:2], gam[:2].double(), tau, E.detach().double(),
                                                     eps=eps.double())
                out.update(_rule("h0", o, r.to(o.dtype), x))
                out["ok"] = out["ok"] and _all_ok(out) and bool(torch.equal(zo, zr))
            return out
        cases.append(Case("kernels", f"relaxed_embedding {mode} fwd+bwd (N={N}, K={K}, D={D})", re_ref, ours, re_check,
                          flops=4.0 * N * K * D, counted="dense relaxation: P @ E forward, P^T dh backward (2NKD each)",
                          items={"tokens": N}))

    # posterior sampling step, from logits and fused with the projection
    a_s, a_t = 0.6, 0.5
    zs = zt.view(1, N)
    lg3 = logits.view(1, N, K)
    gen = torch.Generator(device=device).manual_seed(0)
    ps_ref = lambda: public_posterior_step(lg3, zs, a_s, a_t, generator=gen)                 # noqa: E731
    ps_ours = lambda: sample_posterior(lg3, zs, a_s, a_t, seed=1)                            # noqa: E731

    def ps_check():
        row = logits[0].detach() * 3                     # peaked: most draws on a few dozen ids, a real test
        out = _draws_match_posterior(lambda lg, z: sample_posterior(lg, z, a_s, a_t, seed=2), row, a_s, a_t)
        out["greedy_is_argmax"] = bool(torch.equal(sample_posterior(lg3, zs, 1.0, a_t, final="greedy"),
                                                   lg3.argmax(-1)))
        out["ok"] = out["ok"] and out["greedy_is_argmax"]
        return out
    cases.append(Case("kernels", f"sample_posterior step (N={N}, K={K})", ps_ref, ps_ours, ps_check,
                      bytes=N * K * es, counted="logits read once", items={"tokens": N}))
    hd = h.detach()
    wd, bd = w.detach().to(dtype), b.detach().to(dtype)
    pl_ref = lambda: public_posterior_step(torch.nn.functional.linear(hd, wd, bd), zs, a_s, a_t,  # noqa: E731
                                           generator=gen)
    pl_ours = lambda: sample_posterior_linear(hd, wd, bd, zs, a_s, a_t, seed=1)             # noqa: E731

    def pl_check():
        h1 = hd.view(-1, hd.shape[-1])[:1] * 4                # peaked logits (about N(0, 16))
        row = torch.nn.functional.linear(h1.float(), wd.float(), bd.float())[0]
        out = _draws_match_posterior(
            lambda lg, z: sample_posterior_linear(h1.view(1, 1, -1).expand(1, z.shape[1], -1).contiguous(), wd, bd, z,
                                                  a_s, a_t, seed=3), row, a_s, a_t)
        out["greedy_is_argmax"] = bool(torch.equal(
            sample_posterior_linear(hd, wd, bd, zs, 1.0, a_t, final="greedy"),
            torch.nn.functional.linear(hd.float(), wd.float(), bd.float()).argmax(-1)))
        out["ok"] = out["ok"] and out["greedy_is_argmax"]
        return out
    cases.append(Case("kernels", f"projection + sample_posterior step (N={N}, K={K}, D={D})", pl_ref, pl_ours,
                      pl_check, flops=2.0 * N * K * D, counted="matmul 2NKD", items={"tokens": N}))
    return cases


def _bench_model(p: dict[str, Any], device: torch.device) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name(p["model"], vocab_size=p["vocab"], model_length=p["length"], dropout=0.0)).to(device)
    with torch.no_grad():
        for q in model.parameters():
            q.normal_(0, 0.02)
    return model


def sample_cases(p: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[Case]:
    model = _bench_model(p, device).eval()
    B, L, steps = p["sample_batch"], p["length"], p["steps"]
    cfg = SamplerConfig(steps=steps, batch=B, length=L, noise_removal="greedy", seed=0)

    def dense_step(lg, zz, s, t, generator):
        return public_posterior_step(lg, zz, s, t, generator)
    s_ref = lambda: generate(model, cfg, device, progress=False, step_fn=dense_step)[0]     # noqa: E731
    s_ours = lambda: generate(model, cfg, device, progress=False)[0]                        # noqa: E731

    def s_check():
        a, b = s_ours(), s_ours()
        r = s_ref()
        K = p["vocab"]
        ok = bool(torch.equal(a, b)) and all(bool(((x >= 0) & (x < K)).all()) for x in (a, r))
        return {"ok": ok, "checked": "ours reproducible for a seed, both in range (per-step draws: kernels group)"}
    nfe = steps + 1
    flops = nfe * B * L * model.config.forward_flops_per_token(L)
    return [Case("sample", f"{p['model']} model, {steps} steps + greedy tail (B={B}, L={L}, K={p['vocab']})", s_ref,
                 s_ours, s_check, flops=flops, counted="denoiser forward FLOPs x NFE",
                 items={"samples": B, "NFE": nfe, "tokens": B * L})]


def train_cases(p: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[Case]:
    B, L, K = p["train_batch"], p["length"], p["vocab"]
    model = _bench_model(p, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (B, L), generator=g).to(device)
    gamma = (-3.5 + 1.75 * torch.rand(B, generator=g, dtype=torch.float64)).to(device)
    table = TTable.build(K)
    alpha, dT = table.alpha_and_derivative(gamma)
    dalpha = 1.75 * dT
    sigma = (-torch.log(alpha)).float()
    lin = model.output_layer.linear
    E = model.vocab_embed.embedding
    tau = 1e-3

    def curriculum_loss(fused: bool, eps: torch.Tensor | None = None):
        if fused:
            # the trainer's default relaxation at this tau (auto: adaptive); dense with explicit noise for the check
            mode = "dense" if eps is not None else resolve_mode("auto", tau, K, float(gamma.max()))[0]
            h0, zt = relaxed_embedding(x0, gamma, tau, E, seed=1, mode=mode, eps=eps)
            h = model(None, sigma, inputs_embeds=h0, return_hidden=True)
            return rb_loss_linear(h, lin.weight, lin.bias, zt, x0, alpha, dalpha).mean()
        h0, zt = reference_relaxed_embedding(x0, gamma, tau, E, eps=eps)
        return ref.rb_loss_ref(model(None, sigma, inputs_embeds=h0).float(), zt, x0, alpha, dalpha).mean()

    zt_d, a_d, da_d = ref.sample_qt(x0, alpha, K, generator=torch.Generator(device=device).manual_seed(0)), alpha, dalpha

    def discrete_loss(fused: bool):
        if fused:
            h = model(zt_d, sigma, return_hidden=True)
            return rb_loss_linear(h, lin.weight, lin.bias, zt_d, x0, a_d, da_d).mean()
        return ref.rb_loss_ref(model(zt_d, sigma).float(), zt_d, x0, a_d, da_d).mean()

    def step(loss_fn):
        def run():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()
            return loss.detach()
        return run

    def grads_of(m: torch.nn.Module, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        loss.backward()
        gr = torch.cat([q.grad.flatten() for q in m.parameters()])
        m.zero_grad(set_to_none=True)
        return loss.detach(), gr

    def check(loss_of, exact_of):
        def run():
            lr, gr = grads_of(model, loss_of(False))
            lo, go = grads_of(model, loss_of(True))
            model64 = _bench_model(p, device).double().train()
            model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
            lx, gx = grads_of(model64, exact_of(model64))
            out = {**_rule("loss", lo, lr, lx), **_rule("grad", go, gr, gx)}
            return {"ok": _all_ok(out), **out}
        return run

    def curriculum_exact(m: torch.nn.Module) -> torch.Tensor:
        h0, zt = ref.relaxed_embedding_ref(x0, gamma, tau, m.vocab_embed.embedding, eps=eps.double())
        return ref.rb_loss_ref(m(None, sigma.double(), inputs_embeds=h0), zt, x0, alpha, dalpha).mean()

    def discrete_exact(m: torch.nn.Module) -> torch.Tensor:
        return ref.rb_loss_ref(m(zt_d, sigma.double()), zt_d, x0, a_d, da_d).mean()

    eps = torch.randn(B, L, K, generator=g).to(device)
    flops = B * L * model_flops_per_token(model.config, L)
    name = f"{p['model']} model step (B={B}, L={L}, K={K})"
    return [Case("train", f"curriculum: {name}", step(lambda: curriculum_loss(False)), step(lambda: curriculum_loss(True)),
                 check(lambda fused: curriculum_loss(fused, eps), curriculum_exact), flops=flops,
                 counted="3x forward FLOPs of the denoiser (relaxation and loss not counted)", items={"tokens": B * L}),
            Case("train", f"discrete: {name}", step(lambda: discrete_loss(False)), step(lambda: discrete_loss(True)),
                 check(discrete_loss, discrete_exact), flops=flops, counted="3x forward FLOPs of the denoiser",
                 items={"tokens": B * L})]


CASE_BUILDERS = {"kernels": kernel_cases, "sample": sample_cases, "train": train_cases}


# ---------------------------------------------------------------------------------------------
# Running and printing
# ---------------------------------------------------------------------------------------------

def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, device: torch.device, repeats: int, peaks: tuple[float, float] | None,
             min_seconds: float = 1.0) -> dict[str, Any]:
    """Both paths of one case. A reference path that runs out of device memory is reported as
    such (``ref_ms`` None, ``match`` None: not checked here; the kernel tests check ours)."""
    row: dict[str, Any] = {"group": case.group, "case": case.name, "flops": case.flops, "bytes": case.bytes,
                           "counted": case.counted}
    try:
        check = case.check()
        row["match"] = bool(check["ok"])
    except Exception as e:  # noqa: BLE001 - only out-of-memory is tolerated
        if not _out_of_memory(e):
            raise
        _free(device)
        check, row["match"] = {"ok": None, "error": "reference out of memory"}, None
    row["check"] = check
    try:
        t_ref, t_ours = time_pair(case.ref, case.ours, device, repeats, min_seconds)
        m_ref = peak_memory_mb(case.ref, device)
    except Exception as e:  # noqa: BLE001
        if not _out_of_memory(e):
            raise
        _free(device)
        t_ref = m_ref = None
        row["ref_error"] = "out of memory"
        t_ours = time_fn(case.ours, device, repeats, warmup=1)["median_ms"]
    m_ours = peak_memory_mb(case.ours, device)
    row.update({"ref_ms": t_ref, "ours_ms": t_ours, "speedup": None if t_ref is None else t_ref / t_ours,
                "ref_peak_mb": m_ref, "ours_peak_mb": m_ours,
                "mem_ratio": m_ours / m_ref if m_ref else None})
    for unit, count in case.items.items():
        row[f"ref_{unit}_per_s"] = None if t_ref is None else count / t_ref * 1e3
        row[f"ours_{unit}_per_s"] = count / t_ours * 1e3
    row["ours_tflops"] = case.flops / t_ours * 1e-9 if case.flops else None
    row["ours_gbs"] = case.bytes / t_ours * 1e-6 if case.bytes else None
    if peaks is not None:
        row["ours_pct_peak_flops"] = 100 * case.flops / (t_ours * 1e-3) / peaks[0] if case.flops else None
        row["ours_pct_peak_bw"] = 100 * case.bytes / (t_ours * 1e-3) / peaks[1] if case.bytes else None
    _free(device)
    return row


def run_suite(groups: list[str], preset: str = "tiny", device: str | torch.device = "cpu", dtype: str = "fp32",
              batch: int | None = None, length: int | None = None, repeats: int = 3,
              progress: bool = True, min_seconds: float = 1.0) -> dict[str, Any]:
    """Run the cases of ``groups`` (kernels, sample, train) at ``preset`` sizes; returns the JSON payload."""
    from tqdm.auto import tqdm

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown bench groups {sorted(unknown)}; choose from {GROUPS}")
    device = torch.device(device)
    p = dict(PRESETS[preset])
    if batch:
        p.update(batch=batch, sample_batch=batch, train_batch=batch)
    if length:
        p["length"] = length
    dt = DTYPES[dtype]
    peaks = device_peaks(device)
    t0 = time.perf_counter()
    rows = []
    for grp in groups:
        cases = CASE_BUILDERS[grp](p, device, dt)
        for case in tqdm(cases, desc=f"bench {grp}", disable=not progress, leave=False, dynamic_ncols=True):
            rows.append(run_case(case, device, repeats, peaks, min_seconds))
    return {"bench": "suite", "groups": groups, "preset": preset, "shape": p, "dtype": dtype, "repeats": repeats,
            "min_seconds": min_seconds,
            "env": environment(device), "backend": backend(device), "environment": full_environment(device),
            "device_peaks": None if peaks is None else {"bf16_flops": peaks[0], "bytes_per_s": peaks[1]},
            "seconds": time.perf_counter() - t0, "all_match": all(r["match"] is not False for r in rows), "rows": rows}


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.1f}"


def print_suite(res: dict[str, Any]) -> None:
    print(f"duo-fast bench: preset {res['preset']}, {res['dtype']}, env {res['env']}, backend {res['backend']}")
    cols = [("case", "case", "s"), ("reference ms", "ref_ms", ".2f"), ("ours ms", "ours_ms", ".2f"),
            ("speed-up", "speedup", ".2f"), ("ref peak MB", "ref_peak_mb", ".1f"), ("ours peak MB", "ours_peak_mb", ".1f"),
            ("mem ratio", "mem_ratio", ".3f"), ("ours TFLOP/s", "ours_tflops", ".3f"), ("ours GB/s", "ours_gbs", ".1f")]
    if res["device_peaks"] is not None:
        cols += [("% peak FLOP/s", "ours_pct_peak_flops", ".1f"), ("% peak BW", "ours_pct_peak_bw", ".1f")]
    cols.append(("match", "match", ""))
    for grp in res["groups"]:
        rows = [r for r in res["rows"] if r["group"] == grp]
        print(f"\n[{grp}]")
        print_table(rows, cols)
        units = sorted({k[len("ours_"):-len("_per_s")] for r in rows for k in r if k.startswith("ours_")
                        and k.endswith("_per_s")})
        for r in rows:
            rates = ", ".join(f"{u}/s {_num(r[f'ref_{u}_per_s'])} -> {_num(r[f'ours_{u}_per_s'])}" for u in units
                              if f"ours_{u}_per_s" in r)
            note = f" (reference: {r['ref_error']})" if "ref_error" in r else ""
            print(f"  {r['case']}: {rates}; counted: {r['counted']}{note}")
    bad = [r["case"] for r in res["rows"] if r["match"] is False]
    print(f"\n{len(res['rows'])} cases in {res['seconds']:.0f} s; outputs match: "
          f"{'all' if not bad else 'NO: ' + '; '.join(bad)}")
