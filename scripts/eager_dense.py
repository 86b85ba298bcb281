#!/usr/bin/env python3
"""The dense block stack of `moe bench train`, written in PyTorch eager, for a side-by-side
step time (issue 13, item 5).

`moe bench train` writes the dense model's initial weights (under moe's parameter names) and
the batches of the steps it times into DIR/state.safetensors, the shapes and optimizer
settings into DIR/dims.json, then runs this script from the project's venv:

    .venv/bin/python scripts/eager_dense.py DIR --threads 1 --warmup 1 --iters 5

The model is the one moe builds for a dense config (model/src/transformer.rs): token
embedding; per block `x + attn(rmsnorm(x))`, `x + swiglu(rmsnorm(x))` with grouped-query
attention, rotate-half RoPE and SDPA with a causal mask; final RMSNorm; an untied LM head;
mean cross-entropy. The step is forward, backward, gradient-norm clipping (foreach) and
torch's AdamW (fused on CPU where torch offers it, else foreach) at a constant learning rate,
weight decay on the parameters moe decays. Prints one JSON object: the loss of every step and
the seconds of each timed step, split as moe's bench splits it (data is not counted: the
batches are already tensors).
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open


def load(folder):
    with safe_open(f"{folder}/state.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with open(f"{folder}/dims.json") as f:
        dims = json.load(f)
    return dims, tensors


class Rope:
    """cos/sin tables as moe builds them: angles in f64 on the host, stored as f32."""

    def __init__(self, head_dim, max_seq_len, theta):
        half = head_dim // 2
        i = torch.arange(head_dim, dtype=torch.float64) % half
        inv = theta ** (-2.0 * i / head_dim)
        ang = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.cos = ang.cos().float()
        self.sin = ang.sin().float()

    def apply(self, x):
        t = x.shape[2]
        cos, sin = self.cos[:t], self.sin[:t]
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-b, a], dim=-1) * sin


def rms_norm(x, w, eps):
    inv = x.square().mean(-1, keepdim=True).add(eps).rsqrt()
    return x * inv * w


def forward(p, dims, rope, inputs):
    b, t = inputs.shape
    h, kv, hd = dims["num_heads"], dims["num_kv_heads"], dims["head_dim"]
    eps = dims["norm_eps"]
    x = F.embedding(inputs, p["embed.weight"])
    for i in range(dims["num_layers"]):
        pre = f"layers.{i}."
        y = rms_norm(x, p[pre + "attn_norm.weight"], eps)
        q = (y @ p[pre + "attn.wq"]).view(b, t, h, hd).transpose(1, 2)
        k = (y @ p[pre + "attn.wk"]).view(b, t, kv, hd).transpose(1, 2)
        v = (y @ p[pre + "attn.wv"]).view(b, t, kv, hd).transpose(1, 2)
        q, k = rope.apply(q), rope.apply(k)
        if h != kv:
            k = k.repeat_interleave(h // kv, dim=1)
            v = v.repeat_interleave(h // kv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(b, t, h * hd) @ p[pre + "attn.wo"]
        y = rms_norm(x, p[pre + "ffn_norm.weight"], eps)
        f = F.silu(y @ p[pre + "ffn.w_gate"]) * (y @ p[pre + "ffn.w_up"])
        x = x + f @ p[pre + "ffn.w_down"]
    x = rms_norm(x, p["norm.weight"], eps)
    logits = x @ p["lm_head.weight"].t()
    return logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="folder written by moe bench train")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dims, tensors = load(args.dir)
    inputs, targets = tensors.pop("__inputs"), tensors.pop("__targets")
    params = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    decayed = [params[k] for k in dims["decayed"]]
    plain = [v for k, v in params.items() if k not in set(dims["decayed"])]
    groups = [
        {"params": decayed, "weight_decay": dims["weight_decay"]},
        {"params": plain, "weight_decay": 0.0},
    ]
    opt_kw = dict(lr=dims["lr"], betas=(dims["beta1"], dims["beta2"]), eps=dims["eps"])
    try:
        opt = torch.optim.AdamW(groups, fused=True, **opt_kw)
        impl = "fused"
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, foreach=True, **opt_kw)
        impl = "foreach"
    rope = Rope(dims["head_dim"], dims["max_seq_len"], dims["rope_theta"])
    all_params = list(params.values())
    losses, fwd_bwd, optim = [], [], []
    steps = inputs.shape[0]
    if steps < args.warmup + args.iters:
        sys.exit(f"{args.dir} holds {steps} batches, fewer than warmup + iters")
    for s in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        logits = forward(params, dims, rope, inputs[s])
        v = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape(-1, v), targets[s].reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(all_params, dims["grad_clip"], foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=False)
        t2 = time.perf_counter()
        losses.append(loss.item())
        if s >= args.warmup:
            fwd_bwd.append(t1 - t0)
            optim.append(t2 - t1)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": args.threads,
                "adamw": impl,
                "losses": losses,
                "forward_backward_s": fwd_bwd,
                "optimizer_s": optim,
                "step_s": [a + b for a, b in zip(fwd_bwd, optim)],
            }
        )
    )


if __name__ == "__main__":
    main()
