"""The benchmark's parts: shapes, the matmul peak, the attention kernels alone, the archscale and
Hugging Face model steps, the table and the targets. `python -m bench` (bench/__main__.py, whose
docstring lists the command's uses) runs them; bench/profile.py profiles the same model steps."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from train.registry import Lengths


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
    anchor: str = ""  # archscale rows: the HF row whose tokens/s vs_anchor divides by
    checkpointing: str = ""  # archscale rows: none | full | selective (read by archscale plan)


@dataclass
class ModelSpec:
    """One archscale row: an architecture and objective through the real training step."""

    name: str
    arch: str
    objective: str
    model: dict  # model_zoo overrides
    micro: int
    rows: Lengths = Lengths(0)  # tokens per row (ED: the decoder's, and the encoder's)
    compile: bool = True  # model.compile (torch.compile of every block)
    checkpointing: str = "none"  # none | full | selective
    anchor: str = ""  # the HF row its tokens/s is compared with
    note: str = ""


@dataclass
class Shapes:
    """Benchmark shapes. GPU: the issue's anchors; smoke: tiny, for CPU."""

    device: str
    dtype: torch.dtype
    matmul: int
    attn: tuple  # B, H, S, D
    models: list  # ModelSpec
    seq: int  # HF Llama row length
    ed_in: int  # HF T5 lengths
    ed_out: int
    micro: int
    ed_micro: int
    hf_llama: dict = field(default_factory=dict)
    hf_t5: dict = field(default_factory=dict)
    warmup: int = 3
    iters: int = 10


def gpu_shapes() -> Shapes:
    # CD/ND ~1.36B: HF Llama's anchor shape. ED "matched": the same total parameters (12 + 12
    # layers). ED "T5 shape": HF T5's anchor (24 + 24 layers, d_ff 5120, tied, 2.93B) for the
    # tokens/s ratio at the same shape.
    dec = dict(d_model=2048, n_layers=24, n_heads=16, head_dim=128, d_ff=5632, vocab_size=32128, mlp="swiglu",
               position="rope", tie_embeddings=False)
    ed = dict(d_model=2048, n_layers=12, n_heads=16, head_dim=128, d_ff=5632, vocab_size=32128, mlp="geglu",
              position="t5_bias", tie_embeddings=False)
    t5 = dict(ed, n_layers=24, d_ff=5120, tie_embeddings=True)
    models = [
        ModelSpec("CD:FLM", "cd", "flm", dec, 4, rows=Lengths(2048), anchor="HF Llama"),
        ModelSpec("CD:FLM eager", "cd", "flm", dec, 4, rows=Lengths(2048), compile=False, anchor="HF Llama",
                  note="no torch.compile"),
        ModelSpec("CD:FLM selective AC", "cd", "flm", dec, 4, rows=Lengths(2048), checkpointing="selective",
                  anchor="HF Llama"),
        ModelSpec("ND:PLM", "nd", "plm", dec, 4, rows=Lengths(2048), anchor="HF Llama", note="random prefix per row"),
        ModelSpec("ED:MLM", "ed", "mlm", ed, 2, rows=Lengths(decoder=1024, encoder=1024), anchor="HF T5", note="params as CD"),
        ModelSpec("ED:MLM 512/114", "ed", "mlm", ed, 8, rows=Lengths(decoder=114, encoder=512), anchor="HF T5",
                  note="reference lengths"),
        ModelSpec("ED:MLM T5 shape", "ed", "mlm", t5, 2, rows=Lengths(decoder=1024, encoder=1024), anchor="HF T5",
                  note="HF T5's config"),
    ]
    return Shapes("cuda", torch.bfloat16, 8192, (8, 16, 2048, 128), models, 2048, 1024, 1024, 4, 2,
                  hf_llama=dict(vocab_size=32128, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                num_attention_heads=16),
                  hf_t5=dict(vocab_size=32128, d_model=2048, d_kv=128, d_ff=5120, num_layers=24, num_heads=16,
                             feed_forward_proj="gated-gelu"))


def smoke_shapes() -> Shapes:
    dec = dict(d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=128, vocab_size=512, position="rope", mlp="swiglu")
    ed = dict(d_model=64, n_layers=1, n_heads=4, head_dim=16, d_ff=128, vocab_size=512)
    models = [  # compile off: CPU compilation takes long; tests/test_fastpaths.py covers it
        ModelSpec("CD:FLM", "cd", "flm", dec, 2, rows=Lengths(64), compile=False, anchor="HF Llama"),
        ModelSpec("CD:FLM selective AC", "cd", "flm", dec, 2, rows=Lengths(64), compile=False, checkpointing="selective",
                  anchor="HF Llama"),
        ModelSpec("ND:PLM", "nd", "plm", dec, 2, rows=Lengths(64), compile=False, anchor="HF Llama"),
        ModelSpec("ED:MLM", "ed", "mlm", ed, 2, rows=Lengths(decoder=16, encoder=48), compile=False, anchor="HF T5"),
    ]
    return Shapes("cpu", torch.float32, 256, (2, 4, 64, 16), models, 64, 48, 16, 2, 2,
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
    # a learned table, as in the model: its gradient (scattered from every score) is part of the cost
    table = torch.randn(257, h, device=s.device, dtype=torch.float32, requires_grad=True)
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


def bench_attention(s: Shapes, when: Optional[Callable[[str], bool]] = None):
    """Yields one Row per attention case (those `when(name)` allows, asked just before each is
    measured); vs_anchor: TFLOP/s over the first case's (flash causal)."""
    from model_zoo.blocks import attend, prepare_mask

    b, h, t, d = s.attn
    impl = "flex" if s.device == "cuda" else "sdpa"
    base = None
    for name, spec, bias in attention_cases(s):
        if when is not None and not when(name):
            continue
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
        tf = work / ms / 1e9
        base = tf if base is None else base
        yield Row("attention", name, f"B{b} H{h} S{t} D{d} {kind}", ms, tflops=tf, peak_mem_gb=peak_mem(s.device),
                  vs_anchor=tf / base if base else None,
                  note="plain SDPA" if mask.plain else ("flex" if mask.block is not None else "dense mask"))


# ------------------------------------------------------------------------------------ models
def synthetic_batch(spec: ModelSpec, rows: int) -> dict:
    """Full rows of random tokens in the architecture's batch layout (one example per row; ND: a
    random prefix; registry's random_batch)."""
    from train.registry import get

    return get(spec.arch).random_batch(rows, spec.rows, spec.model["vocab_size"], torch.Generator().manual_seed(0))


def build_step(spec: ModelSpec, s: Shapes, dist):
    """(engine, batch, tokens, flops, params) for one spec: the trainer's own engine set-up
    (train.engine.runtime.initialize over a DeepSpeed config from the run config, ZeRO-1), its block
    preparation (compile / checkpointing) and a synthetic batch of `spec.micro` rows."""
    import model_zoo
    from train.engine import runtime as eng
    from train.config import derive, load_config
    from train.engine.ds_config import build_ds_config
    from train.registry import get

    cfg = load_config(None, [f"model.arch={spec.arch}", f"objective.name={spec.objective}", "schedule.max_steps=100",
                             f"parallel.micro_batch_size={spec.micro}", "parallel.zero_stage=1",
                             f"parallel.precision={'bf16' if s.device == 'cuda' else 'fp32'}",
                             "optim.grad_clip=1.0"])
    model = model_zoo.build(spec.arch, "debug", **spec.model)
    eng.prepare_blocks(model, spec.checkpointing, compile=spec.compile)
    derived = derive(cfg, dist.world_size, tokens_per_sequence=get(spec.arch).tokens_per_row(cfg.objective),
                     bf16_supported=s.device == "cuda")
    engine = eng.initialize(model, cfg, derived, build_ds_config(cfg, derived))
    batch = synthetic_batch(spec, spec.micro)
    tokens = sum(v.numel() for k, v in batch.items() if k in ("input_ids", "decoder_input_ids"))
    return engine, batch, tokens, get(spec.arch).batch_flops(model.config, batch), model_zoo.num_params(model.config)


def release(s: Shapes) -> None:
    import gc

    gc.collect()
    reset_mem(s.device)


def model_steps(s: Shapes, names: Optional[set], when: Optional[Callable[[str], bool]] = None):
    """(spec, engine, batch, tokens, flops, params) for each selected ModelSpec in turn (in `names`,
    and allowed by `when(name)`, asked just before it is built), the previous engine released
    before the next is built."""
    from train.engine import runtime as eng

    dist = eng.setup_distributed()
    for spec in s.models:
        if (names and spec.name not in names) or (when is not None and not when(spec.name)):
            continue
        release(s)
        yield (spec, *build_step(spec, s, dist))


def bench_archscale(s: Shapes, peak: Optional[float], names: Optional[set] = None,
                    when: Optional[Callable[[str], bool]] = None):
    """Yields a Row per ModelSpec (model_steps' selection), through the real step: DeepSpeed
    engine, optimizer step included."""
    from train.engine import runtime as eng

    for spec, engine, batch, tokens, flops, params in model_steps(s, names, when):
        ms = timeit(lambda: eng.train_step(engine, [batch]), s.warmup, s.iters, s.device)
        tf = flops / ms / 1e9
        row = Row("archscale", spec.name, f"{params / 1e9:.2f}B {spec.rows.text()} mb{spec.micro}", ms, tflops=tf,
                  tokens_per_s=tokens / ms * 1e3, peak_mem_gb=peak_mem(s.device), frac_peak=tf / peak if peak else None,
                  note="; ".join(x for x in (spec.note, "compiled" if spec.compile else "",
                                             f"{spec.checkpointing} AC" if spec.checkpointing != "none" else "") if x),
                  anchor=spec.anchor, checkpointing=spec.checkpointing)
        del engine
        yield row


def bench_hf(s: Shapes, peak: Optional[float], when: Optional[Callable[[str], bool]] = None):
    """Yields the anchors' rows: HF Llama and HF T5 (those `when(name)` allows), plain torch AdamW step."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    for name, make, micro, shape in (
            ("HF Llama", lambda: LlamaForCausalLM(LlamaConfig(**s.hf_llama, tie_word_embeddings=False)), s.micro,
             (s.seq, 0)),
            ("HF T5", lambda: T5ForConditionalGeneration(T5Config(**s.hf_t5, dropout_rate=0.0, decoder_start_token_id=0)), s.ed_micro,
             (s.ed_in, s.ed_out))):
        if when is not None and not when(name):
            continue
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
        row = Row("hf", name, f"{n / 1e9:.2f}B mb{micro}", ms, tokens_per_s=tokens / ms * 1e3,
                  peak_mem_gb=peak_mem(s.device), note="plain torch AdamW")
        del model, opt
        yield row


def format_table(rows: list[Row]) -> str:
    head = ["group", "name", "shape", "ms", "TFLOP/s", "tokens/s", "of peak", "vs anchor", "peak GB", "note"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    body = [[r.group, r.name, r.shape, f"{r.ms:.2f}", fmt(r.tflops, ".3g"), fmt(r.tokens_per_s, ",.0f"),
             fmt(r.frac_peak, ".1%"), fmt(r.vs_anchor, ".2f"), fmt(r.peak_mem_gb, ".1f"), r.note] for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(x) for c, x in zip(cells, w))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(b) for b in body])


# ------------------------------------------------------------------------------------ targets
def link_anchors(rows: list[Row]) -> None:
    """vs_anchor of archscale rows: tokens/s over their HF anchor's, measured in the same run."""
    anchors = {r.name: r.tokens_per_s for r in rows if r.group == "hf"}
    for r in rows:
        if r.group == "archscale":
            a = anchors.get(r.anchor)
            r.vs_anchor = r.tokens_per_s / a if a and r.tokens_per_s else None


def targets(rows: list[Row]) -> list[tuple[str, Optional[float], float]]:
    """The issue's targets as (what, measured ratio, target), from rows of one run (None where a
    row is missing)."""
    by = {(r.group, r.name): r for r in rows}

    def get(group, name, attr):
        r = by.get((group, name))
        return getattr(r, attr) if r is not None else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    cd_frac = get("archscale", "CD:FLM", "frac_peak")
    out = [("CD:FLM fraction of measured peak", cd_frac, 0.55),
           ("CD:FLM tokens/s vs HF Llama", get("archscale", "CD:FLM", "vs_anchor"), 1.2),
           ("ND:PLM model TFLOP/s vs CD:FLM", ratio(get("archscale", "ND:PLM", "tflops"),
                                                    get("archscale", "CD:FLM", "tflops")), 0.9)]
    for name in ("ED:MLM", "ED:MLM 512/114"):
        out.append((f"{name} fraction of peak vs CD:FLM's", ratio(get("archscale", name, "frac_peak"), cd_frac), 0.9))
    out.append(("ED:MLM T5 shape tokens/s vs HF T5", get("archscale", "ED:MLM T5 shape", "vs_anchor"), 3.0))
    for r in rows:
        if r.group == "attention" and r.name != "causal (flash)":
            out.append((f"attention {r.name} vs flash causal (TFLOP/s)", r.vs_anchor, 0.8))
    return out


def format_targets(ts) -> str:
    lines = [f"{'target (issue 8)':<62}  measured  target  met"]
    for what, got, want in ts:
        met = "-" if got is None else ("yes" if got >= want else "NO")
        lines.append(f"{what:<62}  {'-' if got is None else format(got, '.2f'):>8}  {want:>6.2f}  {met}")
    return "\n".join(lines)


def environment(smoke: bool) -> dict:
    cuda = torch.cuda.is_available() and not smoke
    env = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "smoke": smoke}
    for mod in ("transformers", "deepspeed"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env


def load_rows(paths: list[str]) -> tuple[list[Row], list[dict]]:
    rows, envs = [], []
    for path in paths:
        try:
            data = json.loads(open(path).read())
            rows += [Row(**r) for r in data["rows"]]
            envs.append(data["env"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: {path} is not a bench JSON file ({e}); give files written by --json")
    return rows, envs
