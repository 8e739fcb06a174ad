"""Bench: posterior sampling, reference-style vs duo_fast, per step and end to end, in one run.

Reference style (what the public sampler does each step): float64 softmax of the logits, the
one-hot of z_t and the dense float64 posterior over B x L x K, full-size Gumbel noise, argmax.
duo_fast: ``duo_fast.ops.sample_posterior`` (Triton one-pass kernel on GPU; the chunked PyTorch
path on CPU). Both run inside the same sampling loop (``duo_fast.sampling.generate``) with the
same denoiser, so "end to end" differs only in the posterior draws.

    python bench/bench_sample.py [--device cpu] [--batch 16] [--length 128] [--vocab 30522] [--steps 8]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from duo_fast import reference as ref  # noqa: E402
from duo_fast.bench.common import environment, peak_memory_mb, print_table, time_fn, write_json  # noqa: E402
from duo_fast.model import DiT, DiTConfig  # noqa: E402
from duo_fast.ops import backend, sample_posterior, sample_posterior_linear  # noqa: E402
from duo_fast.sampling import SamplerConfig, generate  # noqa: E402


def _is_argmax(drawn: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the fused greedy draw is an argmax of ``h W^T + b`` up to the rounding of the
    product: a GEMM with another summation order (cuBLAS) may break near-ties the other way, so
    the drawn id's logit must be within the product's error bound of the row's largest (float64
    logits as the judge)."""
    exact = h.double() @ w.double().T + b.double()
    bound = (h.double().abs() @ w.double().abs().T).amax(-1) + b.double().abs().max()
    eps = torch.finfo(h.dtype).eps
    tol = 2 * h.shape[-1] * eps * bound                              # a dot product's worst-case rounding
    return bool((exact.gather(-1, drawn[..., None])[..., 0] >= exact.amax(-1) - tol).all())


def run(device: torch.device, batch: int, length: int, vocab: int, steps: int, preset: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_name(preset, vocab_size=vocab, model_length=length)).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    z = torch.randint(0, vocab, (batch, length), device=device)
    with torch.no_grad():
        logits = model(z, torch.full((batch,), 1.0, device=device))
    a_s, a_t = 0.6, 0.5
    gen = torch.Generator(device=device).manual_seed(0)
    step_ref = lambda: ref.sample_posterior_dense_ref(logits, z, a_s, a_t, generator=gen)  # noqa: E731
    step_ours = lambda: sample_posterior(logits, z, a_s, a_t, seed=1)                    # noqa: E731
    # correctness on the benchmarked inputs: the greedy final step is deterministic and must agree
    greedy_ok = bool(torch.equal(sample_posterior(logits, z, 1.0, a_t, final="greedy"), logits.argmax(-1)))
    rows = []
    t_ref, t_ours = time_fn(step_ref, device, repeats), time_fn(step_ours, device, repeats)
    m_ref, m_ours = peak_memory_mb(step_ref, device), peak_memory_mb(step_ours, device)
    logits_mb = logits.numel() * logits.element_size() / 2**20
    rows.append({"case": f"posterior step (B={batch}, L={length}, K={vocab})", "ref_ms": t_ref["median_ms"],
                 "ours_ms": t_ours["median_ms"], "speedup": t_ref["median_ms"] / t_ours["median_ms"],
                 "ref_peak_mb": m_ref, "ours_peak_mb": m_ours, "mem_ratio": m_ours / m_ref,
                 "note": f"input logits {logits_mb:.0f} MB not counted"})
    # the same draw fused with the output projection: the reference writes the logits first
    with torch.no_grad():
        h = model(z, torch.full((batch,), 1.0, device=device), return_hidden=True)
    lin = model.output_projection()
    # the logits as the fused op computes them: the weight and bias in the hidden state's dtype
    # (bf16 on CUDA, where the hidden state comes out of autocast)
    w, b = lin.weight.to(h.dtype), lin.bias.to(h.dtype)
    proj_ref = lambda: ref.sample_posterior_dense_ref(F.linear(h, w, b), z, a_s, a_t, generator=gen)  # noqa: E731
    proj_ours = lambda: sample_posterior_linear(h, lin.weight, lin.bias, z, a_s, a_t, seed=1)        # noqa: E731
    with torch.no_grad():
        t_ref, t_ours = time_fn(proj_ref, device, repeats), time_fn(proj_ours, device, repeats)
        m_ref, m_ours = peak_memory_mb(proj_ref, device), peak_memory_mb(proj_ours, device)
        greedy_ok &= _is_argmax(sample_posterior_linear(h, lin.weight, lin.bias, z, 1.0, a_t, final="greedy"), h, w, b)
    rows.append({"case": "output projection + posterior step (fused: no logits)", "ref_ms": t_ref["median_ms"],
                 "ours_ms": t_ours["median_ms"], "speedup": t_ref["median_ms"] / t_ours["median_ms"],
                 "ref_peak_mb": m_ref, "ours_peak_mb": m_ours, "mem_ratio": m_ours / m_ref})
    cfg = SamplerConfig(steps=steps, batch=batch, length=length, noise_removal="greedy", seed=0)
    run_ref = lambda: generate(model, cfg, device, progress=False,                      # noqa: E731
                               step_fn=lambda lg, zz, s, t, generator: ref.sample_posterior_dense_ref(lg, zz, s, t,
                                                                                                      generator))
    run_ours = lambda: generate(model, cfg, device, progress=False)                     # noqa: E731
    e_ref = time_fn(run_ref, device, max(1, repeats // 3), warmup=1)
    e_ours = time_fn(run_ours, device, max(1, repeats // 3), warmup=1)
    nfe = steps + 1
    rows.append({"case": f"end to end: {steps} steps + greedy tail, {preset} model", "ref_ms": e_ref["median_ms"],
                 "ours_ms": e_ours["median_ms"], "speedup": e_ref["median_ms"] / e_ours["median_ms"],
                 "ref_samples_per_s": batch / e_ref["median_ms"] * 1e3,
                 "ours_samples_per_s": batch / e_ours["median_ms"] * 1e3,
                 "ours_nfe_per_s": nfe / e_ours["median_ms"] * 1e3,
                 "ours_tokens_per_s": batch * length / e_ours["median_ms"] * 1e3})
    # the network's share: one denoiser call
    net = time_fn(lambda: model(z, torch.full((batch,), 1.0, device=device)), device, max(1, repeats // 3))
    rows[-1]["network_ms_per_call"] = net["median_ms"]
    rows[-1]["non_network_share_ref"] = max(0.0, 1 - nfe * net["median_ms"] / e_ref["median_ms"])
    rows[-1]["non_network_share_ours"] = max(0.0, 1 - nfe * net["median_ms"] / e_ours["median_ms"])
    return {"bench": "sample", "env": environment(device), "backend": backend(device), "greedy_matches": greedy_ok,
            "shape": {"batch": batch, "length": length, "vocab": vocab, "steps": steps, "preset": preset},
            "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(torch.device(args.device), args.batch, args.length, args.vocab, args.steps, args.preset, args.repeats)
    print(f"posterior sampling; env {res['env']}; backend {res['backend']}; greedy check "
          f"{'ok' if res['greedy_matches'] else 'FAILED'}")
    print_table(res["rows"][:2], [("case", "case", "s"), ("reference ms", "ref_ms", ".1f"), ("ours ms", "ours_ms", ".1f"),
                                  ("speed-up", "speedup", ".2f"), ("ref peak MB", "ref_peak_mb", ".0f"),
                                  ("ours peak MB", "ours_peak_mb", ".0f"), ("mem ratio", "mem_ratio", ".3f")])
    print()
    print_table(res["rows"][2:], [("case", "case", "s"), ("reference ms", "ref_ms", ".0f"), ("ours ms", "ours_ms", ".0f"),
                                  ("speed-up", "speedup", ".2f"), ("ref samples/s", "ref_samples_per_s", ".2f"),
                                  ("ours samples/s", "ours_samples_per_s", ".2f"), ("ours NFE/s", "ours_nfe_per_s", ".2f"),
                                  ("non-network share ref", "non_network_share_ref", ".2f"),
                                  ("ours", "non_network_share_ours", ".2f")])
    write_json(args.json, res)
    if not res["greedy_matches"]:
        raise SystemExit("greedy step disagrees with argmax: the benchmark ran a wrong result")
    return res


if __name__ == "__main__":
    main()
