"""One benchmark command: the hardware's matmul peak, the attention kernels alone, and every
architecture through the real training step, side by side with the Hugging Face anchors.

    python -m bench                       # GPU: the issue's shapes (CD ~1.3B at seq 2048, ...)
    python -m bench --smoke               # CPU: tiny shapes, seconds; keeps the harness working in CI
    python -m bench --only attention      # matmul | attention | models | hf
    python -m bench --json out.json

Prints a table (tokens/s, model TFLOP/s, fraction of the measured peak, ratio to the HF anchor,
peak memory) and writes JSON. Model FLOPs come from model_zoo.train_flops (one formula for all
architectures, attention counted as each mask requires); an attention kernel's FLOPs are the
work its mask requires (4 * B * H * hd * allowed pairs forward, 2.5x that for forward+backward).
Record every GPU run in bench/RESULTS.md with its device, versions and date.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Row:
    group: str
    name: str
    shape: str
    ms: float
    tflops: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_mem_gb: Optional[float] = None
    frac_peak: Optional[float] = None
    vs_anchor: Optional[float] = None
    note: str = ""


@dataclass
class Shapes:
    """Benchmark shapes. GPU: the issue's anchors; smoke: tiny, for CPU."""

    device: str
    dtype: torch.dtype
    matmul: int
    attn: tuple  # B, H, S, D
    dec: dict  # model_zoo overrides for CD / ND
    ed: dict
    seq: int
    ed_in: int
    ed_out: int
    micro: int
    ed_micro: int
    hf_llama: dict = field(default_factory=dict)
    hf_t5: dict = field(default_factory=dict)
    warmup: int = 3
    iters: int = 10


def gpu_shapes() -> Shapes:
    dec = dict(d_model=2048, n_layers=24, n_heads=16, head_dim=128, d_ff=5632, vocab_size=32128, mlp="swiglu",
               position="rope", tie_embeddings=False)
    ed = dict(d_model=2048, n_layers=12, n_heads=16, head_dim=128, d_ff=5632, vocab_size=32128, mlp="geglu",
              position="t5_bias", tie_embeddings=False)
    return Shapes("cuda", torch.bfloat16, 8192, (8, 16, 2048, 128), dec, ed, 2048, 1024, 1024, 4, 2,
                  hf_llama=dict(vocab_size=32128, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                num_attention_heads=16),
                  hf_t5=dict(vocab_size=32128, d_model=2048, d_kv=128, d_ff=5120, num_layers=24, num_heads=16,
                             feed_forward_proj="gated-gelu"))


def smoke_shapes() -> Shapes:
    dec = dict(d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=128, vocab_size=512, position="rope", mlp="swiglu")
    ed = dict(d_model=64, n_layers=1, n_heads=4, head_dim=16, d_ff=128, vocab_size=512)
    return Shapes("cpu", torch.float32, 256, (2, 4, 64, 16), dec, ed, 64, 48, 16, 2, 2,
                  hf_llama=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4),
                  hf_t5=dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                             feed_forward_proj="gated-gelu"), warmup=1, iters=2)


def timeit(fn: Callable, warmup: int, iters: int, device: str) -> float:
    """Median milliseconds of fn() (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mem(device: str) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_mem(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------ matmul
def bench_matmul(s: Shapes) -> Row:
    n = s.matmul
    a = torch.randn(n, n, device=s.device, dtype=s.dtype)
    b = torch.randn(n, n, device=s.device, dtype=s.dtype)
    ms = timeit(lambda: a @ b, s.warmup, s.iters, s.device)
    return Row("peak", "matmul", f"{n}^3 {str(s.dtype).removeprefix('torch.')}", ms, tflops=2 * n ** 3 / ms / 1e9)


# --------------------------------------------------------------------------------- attention
def attention_cases(s: Shapes):
    """(name, MaskSpec-building function, bias?) for the kernels the comparison needs."""
    from model_zoo.masks import MaskSpec, PositionBias

    b, h, t, d = s.attn
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(t // 4, 3 * t // 4, (b,), generator=g)
    bidir = (torch.arange(t)[None, :] < prefix[:, None]).to(s.device)
    docs = torch.randint(1, 5, (b, t), generator=g).sort(dim=1).values.to(s.device)  # ~4 packed documents
    table = torch.randn(257, h, device=s.device, dtype=torch.float32)
    pos = torch.arange(t, device=s.device).expand(b, t)
    bias = PositionBias(table=table, positions=pos, offset=0, span=128)
    return [
        ("causal (flash)", MaskSpec(None, t, t, causal=True), None),
        ("prefix per row", MaskSpec(None, t, t, causal=True, bidir=bidir), None),
        ("packed documents", MaskSpec(docs, t, t, causal=True), None),
        ("T5 bias, causal", MaskSpec(None, t, t, causal=True), bias),
        ("mixed-direction heads", MaskSpec(None, t, t, causal=True, bidir=bidir, direction="mixed_heads",
                                           n_heads=h), None),
        ("encoder, full + T5 bias", MaskSpec(None, t, t, causal=False), bias),
    ]


def bench_attention(s: Shapes) -> list[Row]:
    from model_zoo.blocks import attend, prepare_mask

    b, h, t, d = s.attn
    impl = "flex" if s.device == "cuda" else "sdpa"
    rows = []
    for name, spec, bias in attention_cases(s):
        q, k, v = (torch.randn(b, h, t, d, device=s.device, dtype=s.dtype, requires_grad=True) for _ in range(3))
        mask = prepare_mask(spec, impl, b, s.device, has_bias=bias is not None)
        pairs = float(spec.dense(b, s.device).float().sum()) / (h if spec.per_head else 1)  # allowed (q, k) per head

        def step():
            out = attend(q, k, v, mask, bias, d ** -0.5, impl)
            if s.device == "cuda":
                out.sum().backward()  # flex's backward is GPU-only in torch

        reset_mem(s.device)
        ms = timeit(step, s.warmup, s.iters, s.device)
        fwd = 4 * h * d * pairs
        work = fwd * (3.5 if s.device == "cuda" else 1.0)  # fwd + bwd (bwd ~2.5x fwd)
        kind = "fwd+bwd" if s.device == "cuda" else "fwd"
        rows.append(Row("attention", name, f"B{b} H{h} S{t} D{d} {kind}", ms, tflops=work / ms / 1e9,
                        peak_mem_gb=peak_mem(s.device),
                        note="plain SDPA" if mask.plain else ("flex" if mask.block is not None else "dense mask")))
    base = rows[0].tflops
    for r in rows:
        r.vs_anchor = r.tflops / base if base else None
    return rows


# ------------------------------------------------------------------------------------ models
def synthetic_batch(arch: str, s: Shapes, vocab: int, rows: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if arch == "ed":
        x = torch.randint(2, vocab, (rows, s.ed_in), generator=g)
        y = torch.randint(2, vocab, (rows, s.ed_out), generator=g)
        return dict(input_ids=x, segment_ids=torch.ones_like(x), position_ids=torch.arange(s.ed_in).expand(rows, -1),
                    decoder_input_ids=y, labels=y, decoder_segment_ids=torch.ones_like(y),
                    decoder_position_ids=torch.arange(s.ed_out).expand(rows, -1))
    ids = torch.randint(2, vocab, (rows, s.seq), generator=g)
    prefix = torch.randint(1, s.seq, (rows,), generator=g)
    bidir = torch.arange(s.seq)[None, :] < prefix[:, None]
    labels = ids.masked_fill(bidir, -100) if arch == "nd" else ids.clone()
    return dict(input_ids=ids, labels=labels, segment_ids=torch.ones_like(ids),
                position_ids=torch.arange(s.seq).expand(rows, -1), bidirectional=bidir & (arch == "nd"))


def bench_archscale(s: Shapes, peak: Optional[float]) -> list[Row]:
    """CD:FLM, ND:PLM (random prefix per row), ED:MLM through the real step: DeepSpeed engine,
    optimizer step included."""
    import model_zoo
    from train import engine as eng
    from train.config import derive, load_config
    from train.ds_config import build_ds_config
    from train.registry import get

    dist = eng.setup_distributed()
    rows = []
    for arch, objective in (("cd", "flm"), ("nd", "plm"), ("ed", "mlm")):
        over = s.ed if arch == "ed" else s.dec
        micro = s.ed_micro if arch == "ed" else s.micro
        cfg = load_config(None, [f"model.arch={arch}", f"objective.name={objective}", "schedule.max_steps=100",
                                 f"parallel.micro_batch_size={micro}", "parallel.zero_stage=1",
                                 f"parallel.precision={'bf16' if s.device == 'cuda' else 'fp32'}",
                                 "optim.grad_clip=1.0"])
        reset_mem(s.device)
        model = model_zoo.build(arch, "debug", **over)
        derived = derive(cfg, dist.world_size, tokens_per_sequence=get(arch).tokens_per_row(cfg.objective),
                         bf16_supported=s.device == "cuda")
        engine = eng.initialize(model, cfg, derived, build_ds_config(cfg, derived))
        batch = synthetic_batch(arch, s, over["vocab_size"], micro)
        tokens = sum(v.numel() for k, v in batch.items() if k in ("input_ids", "decoder_input_ids"))
        flops = get(arch).batch_flops(model.config, batch)
        ms = timeit(lambda: eng.train_step(engine, [batch]), s.warmup, s.iters, s.device)
        tf = flops / ms / 1e9
        rows.append(Row("archscale", f"{arch.upper()}:{objective.upper()}",
                        f"{model_zoo.num_params(model.config) / 1e9:.2f}B mb{micro}", ms, tflops=tf,
                        tokens_per_s=tokens / ms * 1e3, peak_mem_gb=peak_mem(s.device),
                        frac_peak=tf / peak if peak else None))
        del engine, model
    return rows


def bench_hf(s: Shapes, peak: Optional[float]) -> list[Row]:
    """The anchors: HF Llama and HF T5, plain torch AdamW step."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    rows = []
    for name, make, micro, shape in (
            ("HF Llama", lambda: LlamaForCausalLM(LlamaConfig(**s.hf_llama, tie_word_embeddings=False)), s.micro,
             (s.seq, 0)),
            ("HF T5", lambda: T5ForConditionalGeneration(T5Config(**s.hf_t5, dropout_rate=0.0, decoder_start_token_id=0)), s.ed_micro,
             (s.ed_in, s.ed_out))):
        reset_mem(s.device)
        model = make().to(s.device, s.dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        vocab = model.config.vocab_size
        if name == "HF T5":
            x = torch.randint(2, vocab, (micro, shape[0]), device=s.device)
            y = torch.randint(2, vocab, (micro, shape[1]), device=s.device)
            kw, tokens = dict(input_ids=x, labels=y), x.numel() + y.numel()
        else:
            x = torch.randint(2, vocab, (micro, shape[0]), device=s.device)
            kw, tokens = dict(input_ids=x, labels=x), x.numel()

        def step():
            model(**kw).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = timeit(step, s.warmup, s.iters, s.device)
        n = sum(p.numel() for p in model.parameters())
        rows.append(Row("hf", name, f"{n / 1e9:.2f}B mb{micro}", ms, tokens_per_s=tokens / ms * 1e3,
                        peak_mem_gb=peak_mem(s.device), note="plain torch AdamW"))
        del model, opt
    return rows


def format_table(rows: list[Row]) -> str:
    head = ["group", "name", "shape", "ms", "TFLOP/s", "tokens/s", "of peak", "vs anchor", "peak GB", "note"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    body = [[r.group, r.name, r.shape, f"{r.ms:.2f}", fmt(r.tflops, ".3g"), fmt(r.tokens_per_s, ",.0f"),
             fmt(r.frac_peak, ".1%"), fmt(r.vs_anchor, ".2f"), fmt(r.peak_mem_gb, ".1f"), r.note] for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(x) for c, x in zip(cells, w))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(b) for b in body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes (what CI runs)")
    p.add_argument("--only", nargs="*", default=["matmul", "attention", "models", "hf"],
                   choices=["matmul", "attention", "models", "hf"])
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    a = p.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        print("error: no GPU here; run with --smoke for the CPU smoke mode", file=sys.stderr)
        return 2
    s = smoke_shapes() if a.smoke else gpu_shapes()
    torch.manual_seed(0)
    rows: list[Row] = []
    peak = None
    if "matmul" in a.only:
        rows.append(bench_matmul(s))
        peak = rows[-1].tflops
    if "attention" in a.only:
        rows += bench_attention(s)
    if "hf" in a.only:
        rows += bench_hf(s, peak)
    if "models" in a.only:
        models = bench_archscale(s, peak)
        anchors = {r.name: r.tokens_per_s for r in rows if r.group == "hf"}
        for r in models:
            anchor = anchors.get("HF T5" if r.name.startswith("ED") else "HF Llama")
            r.vs_anchor = r.tokens_per_s / anchor if anchor and r.tokens_per_s else None
        rows += models
    env = {"device": torch.cuda.get_device_name() if s.device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "smoke": a.smoke}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"# {env}")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
