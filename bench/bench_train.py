"""Training-step throughput: chameleon-lm vs Hugging Face transformers, same config and weights.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python bench/bench_train.py [--steps 3]

Step = forward + backward + AdamW on a batch of 4 × 512 tokens of the ``small`` preset (hidden 512,
8 layers, vocab 65,536), in fp32 and under bf16 autocast. Both sides use the same weights
(ours copied into HF's ChameleonForConditionalGeneration), the same batch and the same optimizer
(``build_adamw``: fused AdamW). Ours runs eager and with its blocks compiled (``TrainConfig.compile``);
HF runs eager. The three take turns step by step and each figure is a median.
Appends the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers
from common import append_results, matmul_peak, timed_interleaved

from chameleon_lm import Chameleon, ChameleonConfig
from chameleon_lm.checkpoints.hf import native_to_hf
from chameleon_lm.training.loss import lm_loss_sums
from chameleon_lm.training.optim import build_adamw


def hf_twin(model: Chameleon) -> torch.nn.Module:
    c = model.config
    hc = transformers.ChameleonConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
        swin_norm=c.swin_norm, rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len,
        vq_config=dict(embed_dim=32, num_embeddings=8192, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 2], resolution=32, num_res_blocks=1),
        vocabulary_map={"<image>": 8711},
    )
    hf = transformers.ChameleonForConditionalGeneration(hc)
    missing, unexpected = hf.load_state_dict(native_to_hf(model.state_dict()), strict=False)
    assert not unexpected and all("vqmodel" in k for k in missing)
    return hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per side (median), taken in turns")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="which rows to run (bf16 autocast is emulated, hence slow, without AMX/AVX512-BF16)")
    args = ap.parse_args()
    torch.manual_seed(0)
    ours = Chameleon(ChameleonConfig.preset("small"))
    hf = hf_twin(ours)
    ids = torch.randint(8200, 65536, (args.batch, args.seq + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    tokens = args.batch * args.seq
    flops_step = ours.config.flops_per_token(args.seq) * tokens

    def our_step(model, opt, dtype):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            s = lm_loss_sums(model.hidden_states(inputs), model.output, targets, z_loss_weight=1e-5)
            loss = s.loss / s.n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def hf_step(opt, dtype):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = hf(input_ids=inputs, labels=inputs).loss  # HF shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    compiled = copy.deepcopy(ours)
    for block in compiled.layers:
        block.compile()
    rows = []
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        if name.split()[0] not in args.precision:
            continue
        for m in (ours, compiled, hf):
            m.train()
        o_opt, c_opt = build_adamw(ours, 1e-4), build_adamw(compiled, 1e-4)
        h_opt = build_adamw(torch.nn.ModuleList(  # the decoder only: the VQ encoder takes no step
            [hf.model.embed_tokens, hf.model.layers, hf.model.norm, hf.lm_head]), 1e-4)
        t = timed_interleaved({
            "hf": lambda: hf_step(h_opt, dtype),
            "ours": lambda: our_step(ours, o_opt, dtype),
            "compiled": lambda: our_step(compiled, c_opt, dtype),
        }, warmup=2, repeat=args.steps)
        peak = matmul_peak(dtype or torch.float32)
        for side in ("ours", "compiled"):
            rows.append(f"| {name}{', blocks compiled' if side == 'compiled' else ''} | "
                        f"{tokens / t[side]:,.0f} | {tokens / t['hf']:,.0f} | **{t['hf'] / t[side]:.2f}×** | "
                        f"{flops_step / t[side] / 1e9:,.1f} GFLOP/s = {flops_step / t[side] / peak:.0%} of "
                        f"{peak / 1e9:,.0f} |")
            print(rows[-1], flush=True)
    append_results(
        f"Training step, `small` preset, batch {args.batch} × {args.seq}",
        "| precision | ours tok/s | HF tok/s | ours / HF | ours achieved (vs measured 2048² matmul peak) |\n"
        "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n",
    )


if __name__ == "__main__":
    main()
