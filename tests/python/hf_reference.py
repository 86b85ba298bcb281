"""Reference side of the Hugging Face interop tests, run with the project's .venv.

  hf_reference.py make --arch mixtral --out DIR [--seed S] [--max-shard-size 20KB]
      A tiny random model built from transformers' own config class, saved with
      save_pretrained (no download).
  hf_reference.py tokenize --hf DIR --text FILE
      Prints the ids AutoTokenizer.from_pretrained(DIR) gives the text of FILE (no special
      tokens), its decoding and the tokenizer class, as JSON.
  hf_reference.py run --hf DIR --input IN.json --output OUT.json
      Loads DIR with AutoModelForCausalLM.from_pretrained (float32, eval mode) and writes the
      logits of IN.json's "tokens" [b, t] and the greedy continuation (KV cache on, as
      users run it) of "prompt" by "new_tokens" tokens.
"""

import argparse
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def tiny_config(arch: str, seed: int):
    common = dict(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if arch == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=32, num_local_experts=4, **common
        )
    if arch == "qwen2_moe":
        # Block 0 dense (mlp_only_layers), block 1 MoE with the gated shared expert; top-k
        # weights not renormalised (the class default).
        return transformers.Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=40,
            num_experts=4,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
            qkv_bias=True,
            **common,
        )
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=32,
            num_experts=4,
            head_dim=8,
            norm_topk_prob=True,
            **common,
        )
    raise SystemExit(f"unknown arch {arch}")


def make(args):
    torch.manual_seed(args.seed)
    cfg = tiny_config(args.arch, args.seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Norm scales start at 1 and biases at 0; perturb them so a misplaced one is visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    kwargs = {}
    if args.max_shard_size:
        kwargs["max_shard_size"] = args.max_shard_size
    model.save_pretrained(args.out, **kwargs)


def run(args):
    with open(args.input) as f:
        spec = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
    model.eval()
    out = {"transformers": transformers.__version__}
    with torch.no_grad():
        tokens = torch.tensor(spec["tokens"], dtype=torch.long)
        out["logits"] = model(tokens).logits.float().tolist()
        prompt = torch.tensor([spec["prompt"]], dtype=torch.long)
        n = spec["new_tokens"]
        gen = model.generate(
            prompt,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        out["generated"] = gen[0, prompt.shape[1] :].tolist()
    with open(args.output, "w") as f:
        json.dump(out, f)


def tokenize(args):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.hf)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text, add_special_tokens=False)
    print(json.dumps({"ids": ids, "decoded": tok.decode(ids), "class": type(tok).__name__}))


def generate_text(args):
    """Greedy continuation of --prompt by the folder's model and tokenizer, as text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.hf)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
    model.eval()
    prompt = torch.tensor([tok.encode(args.prompt, add_special_tokens=False)], dtype=torch.long)
    with torch.no_grad():
        gen = model.generate(
            prompt,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            pad_token_id=0,
        )
    ids = gen[0, prompt.shape[1] :].tolist()
    print(json.dumps({"prompt_ids": prompt[0].tolist(), "ids": ids, "text": tok.decode(ids)}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--arch", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max-shard-size", default=None)
    r = sub.add_parser("run")
    r.add_argument("--hf", required=True)
    r.add_argument("--input", required=True)
    r.add_argument("--output", required=True)
    t = sub.add_parser("tokenize")
    t.add_argument("--hf", required=True)
    t.add_argument("--text", required=True)
    g = sub.add_parser("generate-text")
    g.add_argument("--hf", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--tokens", type=int, required=True)
    args = p.parse_args()
    {"make": make, "run": run, "tokenize": tokenize, "generate-text": generate_text}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
