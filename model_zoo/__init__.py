"""archscale's model zoo: CD, ND and ED transformers on one block library.

    import model_zoo
    model = model_zoo.build("nd", "debug")            # or "cd", "ed" (model_zoo.ARCHS); sizes: model_zoo.SIZES
    out = model(input_ids, prefix_lengths=torch.tensor([3, 5]))
    out.logits                                          # (B, T, vocab)

Single-device torch + transformers only: no DeepSpeed, no training code. Models are Hugging Face
`PreTrainedModel`s (save_pretrained / from_pretrained / generate), registered with the Auto
classes so `AutoModelForCausalLM.from_pretrained(dir)` and `AutoModelForSeq2SeqLM` load them.
"""
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .config import DecoderConfig, EncoderDecoderConfig
from .models import DecoderLM, EncoderDecoderLM, LMOutput
from .sizes import (ALIASES, ARCHS, MODEL_CLASSES, SIZES, build, embedding_params, instantiate, make_config, model_class,
                    num_params, option_names, size_names, sized_config, train_flops)

AutoConfig.register(DecoderConfig.model_type, DecoderConfig, exist_ok=True)
AutoConfig.register(EncoderDecoderConfig.model_type, EncoderDecoderConfig, exist_ok=True)
AutoModelForCausalLM.register(DecoderConfig, DecoderLM, exist_ok=True)
AutoModelForSeq2SeqLM.register(EncoderDecoderConfig, EncoderDecoderLM, exist_ok=True)


def load(path, **kwargs):
    """Load any archscale model directory written by save_pretrained (CD, ND or ED), or by
    `archscale export` in any of its forms (a native Llama / T5 directory converts back)."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type in ("llama", "t5"):
        from transformers import LlamaForCausalLM, T5ForConditionalGeneration

        from .convert import from_llama, from_t5

        if config.model_type == "llama":
            return from_llama(LlamaForCausalLM.from_pretrained(path, **kwargs))
        return from_t5(T5ForConditionalGeneration.from_pretrained(path, **kwargs))
    return model_class(config).from_pretrained(path, **kwargs)


__all__ = ["ALIASES", "ARCHS", "MODEL_CLASSES", "SIZES", "DecoderConfig", "DecoderLM", "EncoderDecoderConfig",
           "EncoderDecoderLM", "LMOutput", "build", "embedding_params", "instantiate", "load", "make_config", "model_class",
           "num_params", "option_names", "size_names", "sized_config", "train_flops"]
