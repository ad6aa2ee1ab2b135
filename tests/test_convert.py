"""Converters: official YOCO state dicts (synthetic, exact key names and shapes) and Llama -> YOCO."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_yoco import output_cache
from hf_yoco.cli import main as cli_main
from hf_yoco.convert import (
    calibrate_shared_kv,
    convert_official_yoco,
    official_yoco_config,
    official_yoco_key_map,
    yocofy_llama,
)

pytestmark = pytest.mark.transformers_compat

GRET_PARAMS = dict(
    dim=32, n_layers=4, hidden_dim=48, n_self_heads=2, n_attn_heads=4, n_attn_kv_heads=2, vocab_size=50,
    rope_theta=10000.0, norm_eps=1e-5,
)  # fmt: skip
SWA_PARAMS = dict(GRET_PARAMS, n_self_heads=4, n_attn_kv_heads=4, sliding_window=3)


def official_state_dict(params: dict) -> dict[str, torch.Tensor]:
    """Random tensors under the official YOCO key names, with the official shapes (yoco.md §5.3)."""
    d, hidden, vocab = params["dim"], params["hidden_dim"], params["vocab_size"]
    kv = params["n_attn_kv_heads"] * d // params["n_attn_heads"]
    shapes = {"embed_tokens.weight": (vocab, d), "output_projection.weight": (vocab, d), "layer_norm.weight": (d,)}
    shapes.update({"cross_decoder.kv_layer_norm.weight": (d,), "cross_decoder.k_proj.weight": (kv, d)})
    shapes["cross_decoder.v_proj.weight"] = (kv, d)
    block = {"mixer_layer_norm.weight": (d,), "final_layer_norm.weight": (d,), "ffn.fc1.weight": (hidden, d)}
    block.update({"ffn.gate.weight": (hidden, d), "ffn.fc2.weight": (d, hidden)})
    for i in range(params["n_layers"] // 2):
        mixer = {f"mixer.{n}_proj.weight": (d, d) for n in ("q", "k", "v", "out")}
        if not params.get("sliding_window"):
            mixer.update({"mixer.g_proj.weight": (d, d), "mixer.gt_proj.weight": (params["n_self_heads"], d)})
        shapes.update({f"self_decoder.layers.{i}.{k}": v for k, v in {**block, **mixer}.items()})
        cross = {"mixer.q_proj.weight": (d, d), "mixer.out_proj.weight": (d, d)}
        shapes.update({f"cross_decoder.layers.{i}.{k}": v for k, v in {**block, **cross}.items()})
    generator = torch.Generator().manual_seed(0)
    return {
        k: (1 + 0.1 * torch.randn(s, generator=generator)) if k.endswith("norm.weight") else
        torch.randn(s, generator=generator) * s[-1] ** -0.5
        for k, s in shapes.items()
    }  # fmt: skip


def official_reference_forward(sd: dict, params: dict, ids: torch.Tensor) -> torch.Tensor:
    """The official YOCO forward written from the spec, independently of hf_yoco's modules."""
    d, eps, theta = params["dim"], params["norm_eps"], params["rope_theta"]
    batch, length = ids.shape

    def rms(x, weight=None):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y if weight is None else y * weight

    def rope(x):  # [B, T, H, D], interleaved pairs, theta ** -linspace(0, 1, D/2)
        angle = 1.0 / theta ** torch.linspace(0, 1, x.shape[-1] // 2)
        freqs = torch.arange(length)[:, None] * angle
        cos, sin = freqs.cos()[None, :, None], freqs.sin()[None, :, None]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)

    def ffn(x, p):
        return F.linear(F.silu(F.linear(x, sd[p + "ffn.fc1.weight"])) * F.linear(x, sd[p + "ffn.gate.weight"]), sd[p + "ffn.fc2.weight"])  # fmt: skip

    def softmax_attention(q, k, v, window=None):  # [B, T, H, D], causal (+ window of `window` keys)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
        t, s = torch.arange(length)[:, None], torch.arange(length)[None, :]
        allowed = (s <= t) if window is None else (s <= t) & (s > t - window)
        return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)

    x = sd["embed_tokens.weight"][ids] * d**0.5
    for i in range(params["n_layers"] // 2):
        p = f"self_decoder.layers.{i}."
        h = rms(x, sd[p + "mixer_layer_norm.weight"])
        heads = params["n_self_heads"]
        q, k, v = (F.linear(h, sd[p + f"mixer.{n}_proj.weight"]).view(batch, length, heads, -1) for n in "qkv")
        q, k = rope(q), rope(k)
        if params.get("sliding_window"):
            out = softmax_attention(q, k, v, params["sliding_window"]).reshape(batch, length, d)
        else:
            k = k * k.shape[-1] ** -0.5
            decay = (F.logsigmoid(F.linear(h, sd[p + "mixer.gt_proj.weight"])) / 16).exp()  # [B, T, H]
            state, outs = torch.zeros(batch, heads, k.shape[-1], v.shape[-1]), []
            for t in range(length):
                state = decay[:, t, :, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
                outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
            out = rms(torch.stack(outs, dim=1)).reshape(batch, length, d)  # subln: no weight
            out = F.silu(F.linear(h, sd[p + "mixer.g_proj.weight"])) * out
        x = x + F.linear(out, sd[p + "mixer.out_proj.weight"])
        x = x + ffn(rms(x, sd[p + "final_layer_norm.weight"]), p)
    h = rms(x, sd["cross_decoder.kv_layer_norm.weight"])
    key = rope(F.linear(h, sd["cross_decoder.k_proj.weight"]).view(batch, length, params["n_attn_kv_heads"], -1))
    value = F.linear(h, sd["cross_decoder.v_proj.weight"]).view(batch, length, params["n_attn_kv_heads"], -1)
    groups = params["n_attn_heads"] // params["n_attn_kv_heads"]
    key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
    for j in range(params["n_layers"] // 2):
        p = f"cross_decoder.layers.{j}."
        h = rms(x, sd[p + "mixer_layer_norm.weight"])
        q = rope(F.linear(h, sd[p + "mixer.q_proj.weight"]).view(batch, length, params["n_attn_heads"], -1))
        x = x + F.linear(softmax_attention(q, key, value).reshape(batch, length, d), sd[p + "mixer.out_proj.weight"])
        x = x + ffn(rms(x, sd[p + "final_layer_norm.weight"]), p)
    return F.linear(rms(x, sd["layer_norm.weight"]), sd["output_projection.weight"])


@pytest.mark.parametrize("params", [GRET_PARAMS, SWA_PARAMS], ids=["gated_retention", "sliding_window"])
def test_official_yoco_converter_matches_reference_forward(tmp_path, params):
    state_dict = official_state_dict(params)
    save_file(state_dict, tmp_path / "model.safetensors")
    (tmp_path / "params.json").write_text(json.dumps(params))
    model = convert_official_yoco(tmp_path)
    assert model.config.official_numerics and model.config.bos_token_id == 0 and model.config.eos_token_id == 2
    ids = torch.randint(0, params["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = official_reference_forward(state_dict, params, ids)
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
        # ... and the cached decode path of the converted model agrees too.
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits] + [model(ids[:, t : t + 1], cache=output_cache(out)).logits for t in range(5, 9)]
        torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-4, rtol=1e-4)


def test_official_converter_cli_and_saved_checkpoint(tmp_path):
    state_dict = official_state_dict(GRET_PARAMS)
    save_file(state_dict, tmp_path / "yoco.safetensors")
    (tmp_path / "params.json").write_text(json.dumps(GRET_PARAMS))
    assert cli_main(["convert", "yoco-official", str(tmp_path / "yoco.safetensors"), str(tmp_path / "out")]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, official_reference_forward(state_dict, GRET_PARAMS, ids), atol=1e-4, rtol=1e-4)  # fmt: skip


def test_official_converter_reports_bad_checkpoints(tmp_path):
    state_dict = official_state_dict(GRET_PARAMS)
    del state_dict["cross_decoder.k_proj.weight"]
    state_dict["decoder.extra.weight"] = torch.zeros(1)
    save_file(state_dict, tmp_path / "model.safetensors")
    (tmp_path / "params.json").write_text(json.dumps(GRET_PARAMS))
    with pytest.raises(ValueError, match=r"missing \(1\): \['cross_decoder.k_proj.weight'\][\s\S]*decoder.extra"):
        convert_official_yoco(tmp_path)

    state_dict = official_state_dict(GRET_PARAMS)
    state_dict["layer_norm.weight"] = torch.ones(31)
    save_file(state_dict, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layer_norm.weight: \(31,\), expected \(32,\)"):
        convert_official_yoco(tmp_path)

    torch.save(state_dict, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="Only safetensors"):
        convert_official_yoco(tmp_path / "checkpoint.pth", GRET_PARAMS)
    with pytest.raises(ValueError, match="n_attn_kv_heads"):
        official_yoco_config({k: v for k, v in GRET_PARAMS.items() if k != "n_attn_kv_heads"})
    with pytest.raises(ValueError, match="n_self_heads == n_attn_heads == n_attn_kv_heads"):
        official_yoco_config(dict(GRET_PARAMS, sliding_window=4))


def test_key_map_covers_every_parameter():
    config = official_yoco_config(GRET_PARAMS)
    from hf_yoco import YocoForCausalLM

    with torch.device("meta"):
        names = set(YocoForCausalLM(config).state_dict())
    assert set(official_yoco_key_map(config).values()) == names


def tiny_llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_yocofy_llama_keeps_lower_half_and_store_layer_exact():
    """With a window covering the sequence, layers 0..L/2 of the YOCO-fied model compute exactly what the Llama
    did: the self-decoder is the Llama's lower half, and the first cross layer reads K/V built from its own
    input norm and k/v projections."""
    llama = tiny_llama()
    yoco = yocofy_llama(llama, "sliding_window", sliding_window=64)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        llama_states = llama(ids, output_hidden_states=True).hidden_states
        yoco_states = yoco(ids, output_hidden_states=True).hidden_states
        for layer in range(4 // 2 + 2):  # embeddings, 2 self layers, first cross layer
            torch.testing.assert_close(yoco_states[layer], llama_states[layer], atol=1e-5, rtol=1e-5)
        assert (yoco_states[-1] - llama_states[-1]).abs().max() > 1e-3  # upper layers now share one K/V
        assert torch.isfinite(yoco(ids).logits).all()


def test_yocofy_llama_gated_retention_and_errors():
    llama = tiny_llama()
    yoco = yocofy_llama(llama, "gated_retention")
    names = dict(yoco.named_parameters())
    k_llama = llama.model.layers[0].self_attn.k_proj.weight.view(2, 8, 32)
    torch.testing.assert_close(names["model.layers.0.self_attn.k_proj.weight"].view(4, 8, 32)[1], k_llama[0])
    torch.testing.assert_close(names["model.layers.0.self_attn.k_proj.weight"].view(4, 8, 32)[2], k_llama[1])
    assert torch.isfinite(yoco(torch.randint(0, 64, (1, 10))).logits).all()
    with pytest.raises(ValueError, match="num_hidden_layers"):
        yocofy_llama(tiny_llama(layers=3))
    assert yocofy_llama(tiny_llama(layers=3), "sliding_window", 8, num_self_decoder_layers=2).config.layer_types == [
        "sliding_attention", "sliding_attention", "full_attention"]  # fmt: skip


def test_yocofy_cli_round_trip(tmp_path):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama")
    assert cli_main(["convert", "llama-to-yoco", str(tmp_path / "llama"), str(tmp_path / "yoco"), "--sliding-window", "8"]) == 0  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "yoco")
    assert model.config.model_type == "hf_yoco" and model.config.sliding_window == 8
    assert model.config.num_self_decoder_layers == 2
    args = ["convert", "llama-to-yoco", str(tmp_path / "llama"), str(tmp_path / "yoco3"), "--self-decoder-layers", "3"]
    assert cli_main(args) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "yoco3").config.num_self_decoder_layers == 3


@torch.no_grad()
def test_calibration_recovers_a_cross_layer_whose_kv_is_a_map_of_the_shared_one():
    """Layer 3 reads layer 2's input (layer 2 adds nothing) with keys = a complex scale per RoPE pair of layer 2's and
    values = a per-head linear map of layer 2's: after calibration the YOCO model equals the Llama exactly."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)  # fmt: skip
    llama = LlamaForCausalLM(config).eval()
    second, third = llama.model.layers[2], llama.model.layers[3]
    second.self_attn.o_proj.weight.zero_()
    second.mlp.down_proj.weight.zero_()  # layer 3's input = layer 2's input
    third.input_layernorm.weight.copy_(second.input_layernorm.weight)
    dim, half = 16, 8
    k2 = second.self_attn.k_proj.weight.view(2, dim, -1)
    v2 = second.self_attn.v_proj.weight.view(2, dim, -1)
    scale = torch.complex(torch.randn(2, half), torch.randn(2, half))[..., None]  # k3 = c * k2 per pair
    a, b = scale.real, scale.imag
    k3 = torch.cat([a * k2[:, :half] - b * k2[:, half:], a * k2[:, half:] + b * k2[:, :half]], dim=1)
    maps = torch.randn(2, dim, dim)  # v3 = M v2 per head
    third.self_attn.k_proj.weight.copy_(k3.reshape(-1, 64))
    third.self_attn.v_proj.weight.copy_(torch.einsum("hij,hjd->hid", maps, v2).reshape(-1, 64))

    ids = torch.randint(0, 64, (2, 12))
    expected = llama(ids).logits
    yoco = yocofy_llama(llama, "sliding_window", 16)
    assert not torch.allclose(yoco(ids).logits, expected, atol=1e-3)
    residuals = calibrate_shared_kv(llama, yoco, torch.randint(0, 64, (8, 16)))
    assert all(fit["keys"] < 1e-4 and fit["values"] < 1e-4 for fit in residuals.values())
    torch.testing.assert_close(yoco(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="window"):
        calibrate_shared_kv(llama, yoco, torch.randint(0, 64, (8, 17)))
    with pytest.raises(ValueError, match="2 \\* hidden_size"):
        calibrate_shared_kv(llama, yoco, torch.randint(0, 64, (4, 16)))
