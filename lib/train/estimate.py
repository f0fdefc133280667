"""How much GPU memory and time a train job needs, from the model's config and the manifest.

::

    shape = model_shape(cfg)                     # the model built on the meta device: no weights read
    setting = Setting.of(cfg, on_gpu=True)       # method, precision, batch, length, ZeRO stage
    memory = estimate_memory(shape, setting)     # Memory(weights=..., adapter=..., ...) in bytes
    memory.total, memory.describe()              # 15.2e9, "weights 13.5 + adapter 0.3 + ... GiB"
    fixes(shape, setting, usable_bytes)          # ["train.method=qlora (5.6 GiB)", ...]

Per GPU, the peak of one optimizer step is the sum of:

- **weights**: the decoder's linear layers at the method's width (bf16 2 bytes, bitsandbytes
  int8 1 byte, nf4 with double quantization 4.127 bits), everything else (embeddings, norms,
  the LM head) at the compute precision. ZeRO-3 shards them over the processes.
- **adapter**: each LoRA parameter in fp32 with its gradient and two Adam moments (16 bytes);
  ZeRO-2 shards gradient and moments, ZeRO-3 all four.
- **activations**, per token of a batch (``batch_size x max_length``) and decoder layer, with
  ``e`` the compute width (2 bytes on GPU, 4 on CPU), ``h`` the hidden size, ``kv`` the key/value
  width, ``i`` the MLP width: ``e(6h + 2kv + 3i)`` for the layer itself, ``5 x in_features + 4r``
  for each LoRA module (its fp32 dropout output and mask), and ``12h`` for the RMSNorms' fp32
  copies when ``e`` is 2. These constants were counted with autograd's saved-tensor hooks on
  Llama-shaped layers (PyTorch 2.13, PEFT, sdpa attention, whose memory grows with the tokens,
  not their square). With gradient checkpointing only each layer's input (``e x h``) is kept,
  plus one layer's activations while it is recomputed.
- **lm head**: TRL's fused head never holds the full logits; it works on tiles of
  ``TRL_TOKEN_TILE x TRL_VOCAB_TILE`` (and without Triton, on CPU, a handful of fp32 temporaries
  of the tile's real width).

``tests/test_estimate.py`` holds the sum against ``measured_peak``, the peak of live tensor bytes
while the real recipe trains tiny models on CPU (bench/bench_estimate.py prints the ratios).

The time is the FLOPs of the tokens (forward 2N, backward 2N + 2 x trainable, one more forward
with checkpointing; attention's own terms added) at ``UTILISATION`` of the GPU's bf16 TFLOP/s.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

from slurmtune.config import RunConfig
from slurmtune.errors import UsageError

GIB = 2**30
# trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE and trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
# (tests/test_estimate.py checks them against the installed TRL).
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
WEIGHT_BYTES = {"lora": None, "lora-8bit": 1.0, "qlora": 4.127 / 8}  # None: the compute width
ADAPTER_BYTES = 16  # fp32 weight, gradient, Adam's two moments
# Share of the GPU's peak bf16 TFLOP/s a LoRA step reaches (small batches, frozen matmuls);
# dequantizing 4-bit and 8-bit weights costs more.
UTILISATION = {"lora": 0.35, "lora-8bit": 0.2, "qlora": 0.25}
STARTUP_S = 120  # loading the model and data before the first step


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config."""

    name: str
    params: int  # all parameters of the base model
    quantizable: int  # parameters of the decoder layers' linear layers (what bitsandbytes quantizes)
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # width of keys (and of values)
    heads: int
    vocab: int
    lora_params: int  # the adapter of the manifest's lora.r and target_modules
    lora_inputs: int  # sum of in_features of the adapted modules of one layer
    lora_modules: int  # adapted modules in one layer
    largest_layer: int  # parameters of the biggest decoder layer (ZeRO-3 gathers one at a time)


@dataclass(frozen=True)
class Setting:
    """The knobs of a run that the memory depends on."""

    method: str
    on_gpu: bool
    checkpointing: bool
    batch_size: int
    max_length: int
    r: int
    processes: int = 1
    zero_stage: int = 0  # 0: no DeepSpeed
    # A vision run's rows are all counted on the login node: its longest row, and the longest
    # under smaller media settings ((``vision.max_pixels=N``, tokens), ...). None: unknown, every
    # row taken as max_length.
    row_tokens: int | None = None
    smaller_media: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, cfg: RunConfig, on_gpu: bool) -> "Setting":
        from slurmtune.train.distributed import deepspeed_config_path, read_deepspeed_config, world_size, zero_stage
        from slurmtune.train.recipe import checkpoints_activations

        processes = world_size(cfg)
        stage = zero_stage(read_deepspeed_config(deepspeed_config_path(cfg))) if processes > 1 else 0
        t = cfg.train
        return cls(t.method, on_gpu, checkpoints_activations(cfg, on_gpu), t.batch_size, t.max_length,
                   cfg.lora.r, processes, stage)

    @property
    def length(self) -> int:
        """Tokens of the longest row a batch is padded to."""
        return min(self.max_length, self.row_tokens) if self.row_tokens else self.max_length

    @property
    def width(self) -> int:
        """Bytes of one activation (bf16 on GPU, fp32 on CPU)."""
        return 2 if self.on_gpu else 4


@dataclass(frozen=True)
class Memory:
    """Peak bytes of one optimizer step on one GPU, by what holds them."""

    weights: int
    adapter: int
    activations: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.lm_head

    def describe(self) -> str:
        parts = ", ".join(f"{name.replace('_', ' ')} {size(getattr(self, name))}"
                          for name in ("weights", "adapter", "activations", "lm_head"))
        return f"{size(self.total)} ({parts})"


def size(n: float) -> str:
    """Bytes as people read them: GiB from 1 GiB up, MiB below."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def model_shape(cfg: RunConfig) -> ModelShape:
    """The model of ``cfg`` built on PyTorch's meta device (shapes only, ~1 s for 7B), so any
    architecture transformers knows is measured the same way."""
    import torch

    config = _model_config(cfg)
    with torch.device("meta"):
        model = _meta_model(config, cfg.model.path)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    decoder = _decoder_layers(model, text.num_hidden_layers)
    targets = set(cfg.lora.target_modules)
    quantizable = lora_params = 0
    first: list[int] = []  # in_features of the adapted modules of the first layer
    for index, layer in enumerate(decoder):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                quantizable += module.weight.numel()
                if name.rsplit(".", 1)[-1] in targets:
                    lora_params += cfg.lora.r * (module.in_features + module.out_features)
                    first += [module.in_features] if index == 0 else []
    return ModelShape(
        name=Path(cfg.model.path).name or (cfg.model.tiny_arch or "model"),
        params=sum(p.numel() for p in model.parameters()), quantizable=quantizable,
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
        kv_dim=getattr(text, "num_key_value_heads", heads) * head_dim, heads=heads, vocab=text.vocab_size,
        lora_params=lora_params, lora_inputs=sum(first), lora_modules=len(first),
        largest_layer=max((sum(p.numel() for p in layer.parameters()) for layer in decoder), default=0))


def _decoder_layers(model, count: int):
    """The language model's decoder layers: the ``...layers`` list of ``count`` blocks outside any
    vision tower (Pixtral's tower has a ``layers`` list too; LoRA and quantization count only these)."""
    import torch

    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"
                and len(module) == count and not any(v in name for v in ("vision", "visual"))):
            return module
    raise UsageError(f"cannot find the {count} decoder layers of {type(model).__name__} to estimate its memory")


def _meta_model(config, path: str):
    """A causal LM, or an image-text-to-text model (Qwen2.5-VL, Mistral3): its language model is
    what LoRA trains; its vision tower counts as frozen weights."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.integrations import deepspeed

    zero3 = deepspeed._hf_deepspeed_config_weak_ref  # set by DeepSpeed training arguments in this process
    deepspeed.unset_hf_deepspeed_config()  # else the meta model is built as ZeRO-3 partitions
    try:
        for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = zero3
    raise UsageError(f"model.path: {path}: transformers cannot build a {config.model_type!r} model for "
                     "training (neither a causal LM nor an image-text-to-text model); expected a model "
                     "folder of such an architecture")


def _model_config(cfg: RunConfig):
    from transformers import AutoConfig

    path = Path(cfg.model.path)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    from slurmtune.train.tiny_model import tiny_config
    return tiny_config(cfg.model.tiny_arch or "llama")


def estimate_memory(shape: ModelShape, s: Setting) -> Memory:
    e = s.width
    linear = (WEIGHT_BYTES[s.method] or e) if s.on_gpu else e  # bitsandbytes quantizes on CUDA only
    weights = shape.quantizable * linear + (shape.params - shape.quantizable) * e
    adapter = shape.lora_params * ADAPTER_BYTES
    if s.zero_stage == 3:
        weights = weights / s.processes + 2 * shape.largest_layer * e  # a layer gathered, the next prefetched
        adapter /= s.processes
    elif s.zero_stage == 2:
        adapter = shape.lora_params * (4 + (ADAPTER_BYTES - 4) / s.processes)
    tokens = s.batch_size * s.length
    per_layer = tokens * layer_activation_bytes(shape, s)
    outside = tokens * 4 * shape.hidden * e  # embeddings, the final norm, the head's input
    head = lm_head_bytes(shape, s, tokens)
    if s.checkpointing:
        kept = shape.layers * tokens * shape.hidden * e
        activations, lm_head = kept + outside + max(0, per_layer - head), head  # the larger of the two peaks
    else:
        activations, lm_head = shape.layers * per_layer + outside, head
    return Memory(int(weights), int(adapter), int(activations), int(lm_head))


def layer_activation_bytes(shape: ModelShape, s: Setting) -> float:
    """Bytes one token leaves saved for the backward pass in one decoder layer."""
    e = s.width
    own = e * (6 * shape.hidden + 2 * shape.kv_dim + 3 * shape.intermediate)
    lora = 5 * shape.lora_inputs + 4 * s.r * shape.lora_modules
    norms = 12 * shape.hidden if e == 2 else 0
    return own + lora + norms


def lm_head_bytes(shape: ModelShape, s: Setting, tokens: int) -> float:
    rows = min(tokens, TRL_TOKEN_TILE)
    tile = rows * TRL_VOCAB_TILE * s.width
    grad_hidden = tokens * shape.hidden * 4
    temporaries = 0 if s.on_gpu else 7 * rows * min(shape.vocab, TRL_VOCAB_TILE) * 4
    return tile + grad_hidden + temporaries


def fixes(shape: ModelShape, s: Setting, usable: float) -> list[str]:
    """The single changes that bring the estimate under ``usable`` bytes, those that cost no
    accuracy first, each with its estimate: ["train.method=qlora: 5.1 GiB", ...]."""
    tries = []
    if s.on_gpu and not s.checkpointing:
        tries.append(("train.gradient_checkpointing=on", replace(s, checkpointing=True)))
    if s.batch_size > 1:
        tries.append(("train.batch_size=1 (and a larger train.grad_accum)", replace(s, batch_size=1)))
    if s.processes > 1 and s.zero_stage != 3:
        tries.append(("distributed.deepspeed=manifests/deepspeed/zero3.json", replace(s, zero_stage=3)))
    methods = list(WEIGHT_BYTES)
    if s.on_gpu and s.processes == 1:
        tries += [(f"train.method={m}", replace(s, method=m)) for m in methods[methods.index(s.method) + 1:]]
    tries += _vision_fixes(s)
    length = s.max_length // 2
    while length >= 256:
        tries.append((f"train.max_length={length} (longer rows are refused or cut)", replace(s, max_length=length)))
        length //= 2
    found = []
    for label, setting in tries:
        total = estimate_memory(shape, setting).total
        if total <= usable:
            found.append(f"{label}: {size(total)}")
            if label.startswith("train.max_length"):
                break  # the longest length that fits is the one to say
    return found


def _vision_fixes(s: Setting) -> list[tuple[str, Setting]]:
    """Fewer pixels per image and frame, or fewer frames: the longest row as the login node
    counted it under each (changes that make no row longer but shrink the media)."""
    return [(label, replace(s, row_tokens=tokens)) for label, tokens in s.smaller_media
            if s.row_tokens and tokens < s.row_tokens]


def train_flops(shape: ModelShape, s: Setting, tokens: float) -> float:
    """FLOPs of training on ``tokens`` tokens (each row's length about max_length at most)."""
    frozen = shape.params - shape.vocab * shape.hidden  # the embedding lookup is no matmul
    per_token = 4 * frozen + 6 * shape.lora_params + (2 * frozen if s.checkpointing else 0)
    attention = 6 * 2 * shape.layers * shape.hidden * s.max_length  # QK^T and AV, forward + backward
    return tokens * (per_token + attention)


def train_seconds(shape: ModelShape, s: Setting, tokens: float, tflops: float) -> float:
    rate = tflops * 1e12 * UTILISATION[s.method] * s.processes
    return STARTUP_S + train_flops(shape, s, tokens) / rate


def requeues(seconds: float, time_min: int, signal_lead_s: int) -> int:
    """Time limits a run of ``seconds`` meets with ``time_min`` per attempt (each attempt loses
    its start-up and the signal's lead)."""
    useful = time_min * 60 - signal_lead_s - STARTUP_S
    if useful <= 0:
        return 10**6
    return max(0, math.ceil((seconds - STARTUP_S) / useful) - 1)


def measured_peak(recipe) -> int:
    """Peak bytes while ``recipe`` (a set-up TrainingRecipe) trains on CPU: the weights it holds and
    the tensors it makes. What the estimate is held against (tests, bench/bench_estimate.py)."""
    model = recipe.trainer.model
    held = list(model.parameters()) + list(model.buffers())
    with TensorMemory(held=held) as memory:
        recipe.train()
    return sum(t.numel() * t.element_size() for t in held) + memory.peak


class TensorMemory:
    """Live and peak bytes of the tensors PyTorch creates inside ``with TensorMemory() as m:``,
    counted per storage as each op returns and freed when the storage is (a dispatch mode:
    exact on CPU, where the allocator keeps no statistics). ``m.peak`` is in bytes. Tensors that
    exist already (``held``: the model's weights) are not counted again when an op views them."""

    def __init__(self, held=()):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self
        self.now = self.peak = 0
        self._live: dict[int, int] = {}
        self._held = {t.untyped_storage().data_ptr() for t in held}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        counter._add(t.untyped_storage())
                return out

        self._mode = _Mode()

    def _add(self, storage) -> None:
        key = storage.data_ptr()
        if not key or key in self._live or key in self._held:
            return
        self._live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key, 0)

    def __enter__(self) -> "TensorMemory":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
