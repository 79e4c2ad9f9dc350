"""The original FFA release's example: batch 10, 32 heads, head_dim 64, a 1,024-token prompt and
128 decode steps, every step checked against PyTorch's own attention over the same keys and values.

    python example.py                 # on the GPU if there is one, else the CPU reference path
    python example.py --steps 16      # shorter
"""

import argparse
import math

import torch
import torch.nn.functional as F

from ff_attention import FastForwardAttn as FFA


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--p", type=float, default=0.0, help="pruning threshold (0 = exact)")
    ap.add_argument("--default-launch", action="store_true", help="one block per (batch, head)")
    ap.add_argument("--hf", action="store_true", help="instead: Hugging Face generate with FFA enabled")
    args = ap.parse_args(argv)
    if args.hf:
        return hf_example()

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    tol = 2e-3 if gpu else 1e-5  # relative L2 error: fp16 output rounding on the GPU
    print(f"FastForwardAttention example on {torch.cuda.get_device_name() if gpu else 'the CPU'}"
          + ("" if gpu else " (no GPU: the pure-PyTorch reference path runs the same steps)"))

    torch.manual_seed(0)
    B, H, D, P = args.batch, args.heads, args.head_dim, args.prompt_len
    K = torch.rand(B, H, P, D, device=device, dtype=dtype)
    V = torch.rand(B, H, P, D, device=device, dtype=dtype)
    ffa = FFA(K, V, P + args.steps, args.default_launch)
    scale = 1 / math.sqrt(D)

    keys, values = K.float(), V.float()  # PyTorch's side keeps its own growing copy
    worst = 0.0
    for step in range(args.steps):
        t = P + step
        q, k, v = (torch.rand(B, H, 1, D, device=device, dtype=dtype) for _ in range(3))
        out = ffa.attention(q, k, v, scale, t, args.p)

        keys, values = torch.cat([keys, k.float()], 2), torch.cat([values, v.float()], 2)
        ref = F.scaled_dot_product_attention(q.float(), keys, values, scale=scale)[:, :, 0]
        err = float((out.float() - ref).norm() / ref.norm())
        worst = max(worst, err)
        if not err <= tol and args.p == 0:  # also catches NaN; p > 0 trades exactness for speed
            raise SystemExit(f"step {step} (t={t}): relative error {err:.2e} exceeds {tol:.0e}")

    print(f"{args.steps} steps of batch {B} x {H} heads x head_dim {D} from a {P}-token prompt: "
          f"every step within {tol:.0e} of PyTorch (worst {worst:.2e}; {dtype}, "
          f"{'default' if args.default_launch else 'optimized'} launch). Timings: bench/kernel_bench.py")


def hf_example():
    """The one-line enable on a Hugging Face model (a small OPT with random weights: no model
    hub here), and the same greedy tokens as Hugging Face's own generate."""
    import transformers

    import ffa.transformers

    device, dtype = ("cuda" if torch.cuda.is_available() else "cpu"), torch.float32  # fp32: exact greedy tokens
    config = transformers.OPTConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                                    vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).to(device, dtype).eval()
    ids = torch.randint(4, 1000, (2, 100), device=device)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0  # the second prompt is left-padded
    kwargs = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = model.generate(ids, **kwargs)
    model = ffa.transformers.enable(model)  # the one line
    got = model.generate(ids, **kwargs)
    same = (got == expected).float().mean().item()
    print(f"Hugging Face generate with FFA on {device} ({dtype}): 2 prompts (one left-padded), 32 new tokens, "
          f"{same:.0%} of tokens equal to Hugging Face's own generate")


if __name__ == "__main__":
    main()
