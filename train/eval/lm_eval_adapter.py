"""The EleutherAI LM evaluation harness (`lm-eval`) on any archscale checkpoint (CD, ND or ED).

    pip install -e .[eval]        # lm-eval (tested with 0.4.13)

From Python (importing this module registers the model under the name "archscale"):

    import lm_eval, train.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="archscale", model_args="pretrained=runs/cd-flm,step=1200",
                            tasks=["hellaswag"])

From the shell, lm-eval's own command line with the adapter imported first:

    python -c "import sys, train.eval.lm_eval_adapter; from lm_eval.__main__ import cli_evaluate; \\
               sys.argv[0] = 'lm-eval'; cli_evaluate()" run --model archscale \\
        --model_args pretrained=runs/cd-flm --tasks my_task --include_path my_tasks/

`pretrained` is a run directory (its newest complete checkpoint, or `step=N`), a
`checkpoints/step-N` directory, or a directory written by `archscale export`.

The three request types reuse `train.eval.evaluate.Scorer`, so the architecture-specific scoring is
the one rank classification uses (ND: the context is the bidirectional prefix; ED: the context
goes to the encoder):

* loglikelihood(context, continuation): text pairs are tokenized as lm-eval's HF model does
  (trailing spaces of the context move to the continuation; the pair is encoded whole and split,
  so merges across the boundary are the whole string's).
* loglikelihood_rolling(text): disjoint windows of `max_length` tokens, each scored given the
  tokens before it (lm-eval's `get_rolling_token_windows`), the first token given EOS.
* generate_until(context, {until, max_gen_toks}): greedy decoding with transformers' generate, cut
  at the first stop string.

Data parallel: under `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes
N`, each process loads the model on its own device and scores every N-th of the batches one process
would score (train/eval/parallel.py); the scores are gathered, so the results are the one-process
results, in the same order. lm-eval is told one process (rank 0, world size 1: its "the model
distributes requests itself" mode), so every process builds the same requests, and only the process
with LOCAL_RANK 0 returns (and writes) results. Generation requests are shared the same way.

Big models: `device_map=auto,max_memory=gpu:20GiB;cpu:60GiB,offload_folder=DIR` places the model
with accelerate, offloading what does not fit (train/eval/placement.py; `;` separates the
max_memory items inside model_args).

lm-eval is imported by this module only; nothing else in archscale needs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("train.eval.lm_eval_adapter needs lm-eval: pip install -e .[eval] (or pip install lm-eval)") from e

from .parallel import Shard, launched, process_state
from .placement import Placement, dispatch, load_export, placement
from .scoring import Scorer, input_device

NAME = "archscale"


def load_for_eval(pretrained: str | Path, step: Optional[int] = None, where: Placement = Placement()):
    """(model, tokenizer, max_length or None, registry entry) from a run / checkpoint / export
    directory: the run's model.arch, or the entry `archscale export` recorded. `where`: placed by
    accelerate with offload (an export is read straight into place; a checkpoint is dispatched)."""
    from .. import registry
    from ..trainer import checkpointing as ckpt
    from ..trainer.weights import checkpoint_dir, load_model

    path = Path(pretrained)
    if (path / "config.json").is_file() and not (path / ckpt.STATE_FILE).is_file():  # archscale export
        import json

        from transformers import AutoTokenizer

        model, record = load_export(path, where), path / "archscale_export.json"
        # the run's entry as `archscale export` recorded it; a bare save_pretrained directory: the
        # entry its config is an instance of
        if record.is_file():
            arch = registry.get(json.loads(record.read_text())["arch"])
        else:
            arch = registry.entry_of(model.config)
        return model, AutoTokenizer.from_pretrained(path), None, arch
    step_dir = path if (path / ckpt.STATE_FILE).is_file() else checkpoint_dir(path, step)
    model, tok, cfg = load_model(step_dir)
    model = dispatch(model, where)
    arch = registry.get(cfg.model.arch)
    # the longest input the run trained on: decoder rows, or the encoder's inputs
    return model, tok, arch.row_lengths(cfg.objective).model_input, arch


@register_model(NAME)
class ArchscaleLM(LM):
    """lm-eval model over an archscale checkpoint. model_args: pretrained (required), step,
    device, batch_size, max_length (context tokens; default: the run's training length, 2048 for
    an export), max_gen_toks (default 256), device_map / max_memory / offload_folder (placement.py)."""

    def __init__(self, pretrained: str, step: Optional[int] = None, device: Optional[str] = None,
                 batch_size: int | str = 16, max_length: Optional[int] = None, max_gen_toks: int = 256,
                 device_map: Optional[str] = None, max_memory: Optional[str] = None,
                 offload_folder: Optional[str] = None, **kwargs):
        super().__init__()
        import torch

        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
        self.shard = None
        if launched():  # one of several processes: this process's device, its share of the batches
            state = process_state(str(device))
            self.shard, device = Shard.of(state), "cpu" if str(device) == "cpu" else str(state.device)
        gpu = torch.device(device).index if str(device).startswith("cuda") else None
        where = placement(device_map, max_memory, offload_folder, gpu)
        model, tok, trained_length, arch = load_for_eval(pretrained, None if step in (None, "") else int(step), where)
        if where.device_map is None:
            model = model.to(torch.device(device))
        self.model = model.eval()
        self._device = input_device(self.model)
        self.tokenizer = tok
        self.max_length = int(max_length or trained_length or 2048)
        self.max_gen_toks = int(max_gen_toks)
        bs = 16 if batch_size in (None, "", "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(self.model, arch, batch_size=bs, max_length=self.max_length, eos_id=tok.eos_token_id,
                             pad_id=tok.pad_token_id, shard=self.shard)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or "archscale"

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:  # "Answer: " + "yes" -> "Answer:" + " yes"
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        for i, (_, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"request {i}: the continuation {requests[i].args[1]!r} has no tokens")
        return [(s.sum, s.greedy) for s in self.scorer.loglikelihoods(pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, r in enumerate(requests):
            (text,) = r.args[:1]
            toks = self._encode(text)
            for w in get_rolling_token_windows(toks, prefix_token=self.tokenizer.eos_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        out = [0.0] * len(requests)
        for i, s in zip(owner, self.scorer.loglikelihoods(windows)):
            out[i] += s.sum
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, one request at a time (every N-th request under a data-parallel launch)."""
        if self.shard is None:
            return [self._generate(r) for r in requests]
        return self.shard.in_order(len(requests), lambda i: self._generate(requests[i]))

    def _generate(self, r) -> str:
        import torch

        context, gen_kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        ctx = self._encode(context)[-self.max_length:] or [self.tokenizer.eos_token_id]
        ids = torch.tensor([ctx], device=self._device)
        with torch.no_grad():
            gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = self.scorer.arch.generated_tokens(gen, len(ctx))
        text = self.tokenizer.decode(new.tolist(), skip_special_tokens=True)
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text
