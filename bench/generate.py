"""Our models against transformers' on the same weights: greedy generation and training steps.

    python -m bench.generate                    # d_model 256, 4 layers, vocab 8192 (the issue's shape), CPU
    python -m bench.generate --threads 2 --repeats 9 --json out.json
    python -m bench.generate --smoke            # the debug size, one repeat: seconds (tests/test_bench.py)
    python -m bench.generate --device cuda      # on a GPU

ED is compared with T5ForConditionalGeneration, CD with LlamaForCausalLM, each built from our
model's weights by model_zoo.export (to_t5 / to_llama), so both sides compute the same function
(greedy outputs are checked equal before anything is timed). Each row is the median of
--repeats timed runs after one warm-up, ours and HF's alternating, on --clock (CPU: the process's
CPU time by default); ratio = ours / HF (below 1: ours is faster). Record CPU and GPU runs in bench/RESULTS.md with the machine and date.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

import model_zoo
from model_zoo.export import to_llama, to_t5

SHAPE = dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=640, vocab_size=8192)
SMOKE = dict(d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=128, vocab_size=512)
# (row, arch, our options, converter, encoder-decoder): ED with the reference's T5 blocks, CD with Llama's
MODELS = [("ED", "ed", {}, to_t5, True), ("CD", "cd", dict(position="rope", mlp="swiglu"), to_llama, False)]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn, device, clock) -> float:
    _sync(device)
    t = clock()
    fn()
    _sync(device)
    return clock() - t


def _median_pair(ours, hf, repeats: int, device, clock) -> tuple[float, float]:
    ours(), hf()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(_timed(ours, device, clock))
        b.append(_timed(hf, device, clock))
    return statistics.median(a), statistics.median(b)


def _generate_fns(arch, seq2seq, ours, ref, args, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, ours.config.vocab_size, (args.batch, args.prompt), generator=g).to(device)
    mask = torch.ones_like(x)
    kw = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def run(model):
        with torch.no_grad():
            return model.generate(input_ids=x, attention_mask=mask, **kw)

    a, b = run(ours), run(ref)
    if a.tolist() != b.tolist():
        raise RuntimeError(f"{arch}: our greedy output differs from HF's on the same weights; not timing it")
    return (lambda: run(ours)), (lambda: run(ref))


def _train_fns(arch, seq2seq, ours, ref, args, device):
    g = torch.Generator().manual_seed(2)
    v = ours.config.vocab_size
    x = torch.randint(3, v, (args.batch, args.train_len), generator=g).to(device)
    if seq2seq:
        y = torch.randint(3, v, (args.batch, max(1, args.train_len // 4)), generator=g).to(device)
        batch = dict(input_ids=x, attention_mask=torch.ones_like(x), labels=y)
    else:
        batch = dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x)

    def step_fn(model):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    return step_fn(ours), step_fn(ref)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    shape = SMOKE if args.smoke else SHAPE
    rows = []
    for name, arch, opts, convert, seq2seq in MODELS:
        torch.manual_seed(0)
        ours = model_zoo.build(arch, "debug", **shape, **opts).to(device).eval()
        ref = convert(ours).to(device).eval()
        for what, make in (("generate", _generate_fns), ("train step", _train_fns)):
            if args.only and args.only != what.split()[0]:
                continue
            a, b = make(arch, seq2seq, ours, ref, args, device)
            t_ours, t_hf = _median_pair(a, b, args.repeats, device, CLOCKS[args.clock])
            rows.append({"model": f"{name} {what}", "ours_s": t_ours, "hf_s": t_hf, "ratio": t_ours / t_hf,
                         "hf": type(ref).__name__})
            print(f"{name + ' ' + what:<16} ours {t_ours * 1e3:9.1f} ms   {type(ref).__name__:<27} "
                  f"{t_hf * 1e3:9.1f} ms   ratio {t_ours / t_hf:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: steadier on a shared machine)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row, the median reported (default 5)")
    p.add_argument("--batch", type=int, default=4, help="rows per batch (default 4)")
    p.add_argument("--prompt", type=int, default=64, help="prompt / encoder input tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated (default 32)")
    p.add_argument("--train-len", type=int, default=128, help="train step: tokens per row (ED: targets a quarter)")
    p.add_argument("--clock", choices=list(CLOCKS), default=None,
                   help="cpu: this process's CPU time (the default on CPU: a machine shared with other work "
                        "inflates wall time, not CPU time); wall: elapsed time (the default, and the only "
                        "meaningful one, on CUDA)")
    p.add_argument("--only", choices=["generate", "train"], default=None, help="one kind of row only")
    p.add_argument("--smoke", action="store_true", help="the debug size, one repeat, few tokens: seconds")
    p.add_argument("--json", default=None, help="also write the rows and the environment to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    if min(args.threads, args.repeats, args.batch, args.prompt, args.new_tokens, args.train_len) < 1:
        print("error: --threads, --repeats, --batch, --prompt, --new-tokens and --train-len must be >= 1",
              file=sys.stderr)
        return 2
    if args.clock is None:
        args.clock = "wall" if args.device == "cuda" else "cpu"
    if args.smoke:
        args.repeats, args.prompt, args.new_tokens, args.train_len = 1, 8, 4, 16
    torch.set_num_threads(args.threads)
    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "device": args.device, "threads": args.threads, "clock": args.clock, "torch": torch.__version__,
           "transformers": __import__("transformers").__version__}
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
