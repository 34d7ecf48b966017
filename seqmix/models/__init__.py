"""seqmix's models: the mixer registry, model configs, the builder and generation.

from flax import nnx
from seqmix.models import build_model, generate, model_config

config = model_config(layers="MMMA", legend={"M": "mamba2", "A": "attention"},
                      d_model=64, vocab_size=100)
model = build_model(config, rngs=nnx.Rngs(0))
logits = model(tokens)                         # [B, T, 100] float32
out = generate(model, tokens[:, :4], 16)       # greedy continuation

model, config, source = load_pretrained("path/to/hf_checkpoint")   # Llama-family safetensors
save_pretrained(model, config, "path/to/copy", source=source)

Converting attention layers into other mixers: ``seqmix.models.convert`` and
``seqmix.models.layerwise``.
"""

from seqmix.models.builder import build_model, param_count
from seqmix.models.causal_lm import CausalLM
from seqmix.models.classifier import SequenceClassifier
from seqmix.models.config import LEGEND, layer_names, model_config
from seqmix.models.generate import generate
from seqmix.models.interop import as_linen
from seqmix.models.pretrained import load_pretrained, save_pretrained
from seqmix.models.registry import MIXERS, build_mixer, layer_config, mixer_class

__all__ = [
    "LEGEND",
    "MIXERS",
    "CausalLM",
    "SequenceClassifier",
    "as_linen",
    "build_mixer",
    "build_model",
    "generate",
    "layer_config",
    "layer_names",
    "load_pretrained",
    "mixer_class",
    "model_config",
    "param_count",
    "save_pretrained",
]
