"""The denoiser (section 7): the public parameter layout, loading, inputs, numerics."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from dit_oracle import manual_forward

from duo_fast.io.hf_folder import save_hf_folder
from duo_fast.io.pretrained import load_pretrained
from duo_fast.model import DiT, DiTConfig


def expected_small_layout(K: int = 50257) -> list[tuple[str, tuple[int, ...]]]:
    """The key list of section 7, written out independently of the model code."""
    D, C, nb, hd = 768, 128, 12, 64
    keys = [("vocab_embed.embedding", (K, D)),
            ("sigma_map.mlp.0.weight", (C, 256)), ("sigma_map.mlp.0.bias", (C,)),
            ("sigma_map.mlp.2.weight", (C, C)), ("sigma_map.mlp.2.bias", (C,)),
            ("rotary_emb.inv_freq", (hd // 2,))]
    for n in range(nb):
        b = f"blocks.{n}."
        keys += [(b + "norm1.weight", (D,)), (b + "attn_qkv.weight", (3 * D, D)), (b + "attn_out.weight", (D, D)),
                 (b + "norm2.weight", (D,)), (b + "mlp.0.weight", (4 * D, D)), (b + "mlp.0.bias", (4 * D,)),
                 (b + "mlp.2.weight", (D, 4 * D)), (b + "mlp.2.bias", (D,)),
                 (b + "adaLN_modulation.weight", (6 * D, C)), (b + "adaLN_modulation.bias", (6 * D,))]
    keys += [("output_layer.norm_final.weight", (D,)), ("output_layer.linear.weight", (K, D)),
             ("output_layer.linear.bias", (K,)), ("output_layer.adaLN_modulation.weight", (2 * D, C)),
             ("output_layer.adaLN_modulation.bias", (2 * D,))]
    return keys


def test_small_state_dict_layout():
    with torch.device("meta"):
        model = DiT(DiTConfig.from_name("small"))
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected_small_layout()
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()


def _random_tiny(K=97, L=24, seed=0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DiTConfig.from_name("tiny", vocab_size=K, model_length=L, n_blocks=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)            # zero-initialised layers would hide errors
    return model.eval()


def test_backbone_prefixed_state_dict_loads(tmp_path):
    model = _random_tiny()
    sd = {"backbone." + k: v for k, v in model.state_dict().items()}
    fresh = DiT(model.config)
    missing, unexpected = fresh.load_state_dict({k[len("backbone."):]: v for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected
    save_hf_folder(model, tmp_path / "ck")
    loaded, info = load_pretrained(tmp_path / "ck")
    ids, sigma = torch.randint(0, 97, (2, 24)), torch.rand(2)
    assert torch.equal(loaded(ids, sigma), model(ids, sigma))
    assert info.vocab_size == 97 and info.config["n_blocks"] == 2


def test_every_input_form_gives_the_same_logits():
    model = _random_tiny()
    ids, sigma = torch.randint(0, 97, (2, 24)), torch.rand(2) * 3
    out = model(ids, sigma)
    assert out.shape == (2, 24, 97)
    dense = torch.nn.functional.one_hot(ids, 97).float()
    assert_close(model(dense, sigma), out, atol=1e-5, rtol=1e-5, what="dense weights")
    bag = (torch.stack([ids, (ids + 1) % 97], -1), torch.tensor([1.0, 0.0]).expand(2, 24, 2))
    assert_close(model(bag, sigma), out, atol=1e-5, rtol=1e-5, what="bag")
    assert_close(model(None, sigma, inputs_embeds=model.vocab_embed(ids)), out, atol=0, rtol=0, what="embeds")
    h = model(ids, sigma, return_hidden=True)
    assert h.shape == (2, 24, model.config.hidden_dim)
    assert_close(model.output_layer.linear(h), out, atol=1e-5, rtol=1e-5, what="hidden -> logits")


def test_numerics_match_the_written_out_forward():
    model = _random_tiny().double()
    ids, sigma = torch.randint(0, 97, (2, 24)), torch.rand(2, dtype=torch.float64) * 3
    out = model(ids, sigma)
    assert_close(out, manual_forward(model, ids, sigma), atol=1e-10, rtol=1e-8, what="forward")


def test_time_conditioning_off_ignores_sigma():
    model = _random_tiny()
    model.config.time_conditioning = False
    ids = torch.randint(0, 97, (2, 24))
    assert torch.equal(model(ids, torch.tensor([0.1, 2.0])), model(ids, torch.tensor([5.0, 0.0])))


def test_bad_inputs_are_errors():
    model = _random_tiny()
    with pytest.raises(RuntimeError, match="out of range"):
        model(torch.full((1, 24), 97), torch.rand(1))
    with pytest.raises(ValueError, match="dense relaxed input"):
        model(torch.rand(1, 24, 50), torch.rand(1))
    with pytest.raises(ValueError, match="sigma"):
        model(torch.randint(0, 97, (2, 24)), torch.rand(3))
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(hidden_dim=100, n_heads=3)
