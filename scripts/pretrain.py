"""Pretrain the tiny Llama shipped as lora_lab/weights/base.safetensors.

    python scripts/pretrain.py            # 1500 steps, about 10 minutes (single-threaded)
    python scripts/pretrain.py --out DIR  # write somewhere else

Seeded and single-threaded with deterministic algorithms: rerunning it with the same torch build on the
same kind of CPU gives the same weights bit for bit. The corpus is `lora_lab.data.pretraining_corpus`.
With torch 2.13.0 on x86-64 a rerun reproduces the shipped file exactly (held-out loss 0.5406):

    sha256 5b8f3fe8e7349fe3ac248941039c0990515c12fef216f1e8760150ed8b4d9381  base.safetensors
"""

import argparse
import math
import time

import torch

from lora_lab.data import encode_batch, get_tokenizer, pretraining_corpus
from lora_lab.checkpoint import WEIGHTS_DIR, save_base_model
from lora_lab.model import LlamaConfig, LlamaForCausalLM

SEQ_LEN = 48


@torch.no_grad()
def corpus_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy over the non-padding targets (eos included)."""
    model.eval()
    labels = ids.masked_fill(ids == get_tokenizer().pad_id, -100)
    loss = sum(model(ids[i:i + 500], labels[i:i + 500])[0] * (labels[i:i + 500, 1:] != -100).sum()
               for i in range(0, len(ids), 500))
    model.train()
    return float(loss / (labels[:, 1:] != -100).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS_DIR))
    args = parser.parse_args()

    torch.set_num_threads(1)  # reductions split across threads could round differently
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    tok = get_tokenizer()
    train = encode_batch(tok, pretraining_corpus(20000, seed=args.seed), SEQ_LEN)  # (N, T)
    held_out = encode_batch(tok, pretraining_corpus(2000, seed=args.seed, split="eval"), SEQ_LEN)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size))
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        # linear warmup for 100 steps, then cosine decay to 10% of the peak
        t = min(1.0, (step + 1) / 100)
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * min(t, decay)
        ids = train[torch.randint(len(train), (args.batch_size,), generator=gen)]
        loss, _ = model(ids, ids.masked_fill(ids == tok.pad_id, -100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    print(f"held-out corpus loss: {corpus_loss(model, held_out):.4f} nats/token")
    save_base_model(model, args.out)


if __name__ == "__main__":
    main()
