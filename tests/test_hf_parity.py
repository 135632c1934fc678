"""Our transformer against Hugging Face's ChameleonForConditionalGeneration (same weights, fp32)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chameleon_lm import Chameleon, ChameleonConfig  # noqa: E402
from chameleon_lm.checkpoints.hf import hf_to_native, native_to_hf  # noqa: E402

CODEBOOK = 64


def hf_model(cfg: ChameleonConfig):
    hc = transformers.ChameleonConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, swin_norm=cfg.swin_norm, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        vq_config=dict(embed_dim=32, num_embeddings=CODEBOOK, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 2], resolution=32, num_res_blocks=1),
        vocabulary_map={f"IMGIMG{chr(65 + i)}Z": 4 + i for i in range(10)}
        | {f"IMGIMG{chr(65 + i // 10)}{chr(65 + i % 10)}Z": 4 + i for i in range(10, CODEBOOK)}
        | {"<image>": 300},
    )
    return transformers.ChameleonForConditionalGeneration(hc).eval()


@pytest.mark.parametrize("swin", [False, True])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_logits_equal_hf(swin, kv_heads):
    cfg = ChameleonConfig.preset("tiny", swin_norm=swin, n_kv_heads=kv_heads)
    hf = hf_model(cfg)
    sd = hf.state_dict()
    for k in sd:  # give the norms non-trivial values so a misplaced norm would show
        if "norm" in k and "vqmodel" not in k:
            sd[k] = torch.randn_like(sd[k])
    hf.load_state_dict(sd)
    ours = Chameleon(cfg).eval()
    ours.load_state_dict(hf_to_native(sd), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = ours(ids), hf(input_ids=ids).logits
    image = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    image[4 : 4 + CODEBOOK] = True
    torch.testing.assert_close(a[..., ~image], b[..., ~image], atol=1e-5, rtol=1e-5)
    # HF overwrites image-token logits with the dtype minimum; ours are raw.
    assert (b[..., image] == torch.finfo(b.dtype).min).all()
    assert torch.isfinite(a[..., image]).all()


def test_key_mapping_round_trip():
    cfg = ChameleonConfig.preset("tiny")
    sd = Chameleon(cfg).state_dict()
    back = hf_to_native(native_to_hf(sd))
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)
    with pytest.raises(KeyError, match="unexpected"):
        hf_to_native({"model.layers.0.self_attn.rotary.weight": torch.zeros(1)})
