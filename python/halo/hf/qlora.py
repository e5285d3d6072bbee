"""The QLoRA recipe on halo, as the example, the demo and the benchmark run it.

A recipe is a dict (examples/qlora.yaml) whose sections use the keys users already write:
``quantization`` (``BitsAndBytesConfig``'s), ``lora`` (``LoraConfig``'s) and ``training``
(``TrainingArguments``'s, including ``optim: paged_adamw_8bit``). :func:`load_model` builds
the model with halo (``HaloConfig.from_bnb`` of the quantization section, PEFT with halo's
fused LoRA layer, ``halo.optim`` for the 8-bit optimizer) or, for comparison, with
bitsandbytes + PEFT; :func:`train` runs transformers' ``Trainer`` and returns the losses.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["InstructionData", "Run", "load_model", "load_recipe", "make_dataset", "resolve_dtypes", "train"]

OPTIMIZERS_8BIT = {"paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_bnb_8bit"}


def load_recipe(path: Any) -> dict:
    """The recipe YAML as a dict, with the sections checked."""
    import yaml

    recipe = yaml.safe_load(Path(path).read_text())
    if not isinstance(recipe, dict):
        raise TypeError(f"[load_recipe] {path} must hold a mapping, got {type(recipe).__name__}")
    for section in ("model", "data", "quantization", "lora", "training"):
        if section not in recipe:
            raise ValueError(f"[load_recipe] {path} lacks the '{section}' section")
    return recipe


def resolve_dtypes(recipe: dict) -> dict:
    """A copy of ``recipe`` with ``quantization.bnb_4bit_compute_dtype: auto`` and
    ``training.bf16: auto`` replaced by the choice of :func:`halo.hf.auto_compute_dtype` (bfloat16
    where the machine computes it natively, float32 elsewhere; one line on stderr says which and
    why). Explicit values are kept as they are. Both systems ("halo", "bnb") get the same choice."""
    quant, training = dict(recipe["quantization"]), dict(recipe["training"])
    if "auto" in (quant.get("bnb_4bit_compute_dtype"), training.get("bf16")):
        from .quantizer import resolve_compute_dtype

        auto = resolve_compute_dtype("auto")
        if quant.get("bnb_4bit_compute_dtype") == "auto":
            quant["bnb_4bit_compute_dtype"] = str(auto).removeprefix("torch.")
        if training.get("bf16") == "auto":
            training["bf16"] = auto == torch.bfloat16
    return {**recipe, "quantization": quant, "training": training}


def _chat(tokenizer: Any, instruction: str, response: str | None) -> str:
    messages = [{"role": "user", "content": instruction}]
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False)


@dataclass
class InstructionData(torch.utils.data.Dataset):
    """Tokenized chat examples; the loss covers the response tokens only."""

    items: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def make_dataset(tokenizer: Any, path: Any, max_length: int, pad_to: int | None = None) -> InstructionData:
    """Rows of examples/data/instructions.jsonl as input_ids / attention_mask / labels
    (prompt tokens masked with -100). ``pad_to`` pads every row to that length, so a
    benchmark runs sequences of exactly that size."""
    items = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        prompt = tokenizer(_chat(tokenizer, row["instruction"], None), add_special_tokens=False).input_ids
        full = tokenizer(
            _chat(tokenizer, row["instruction"], row["response"]), add_special_tokens=False
        ).input_ids
        ids = full[:max_length]
        labels = [-100] * min(len(prompt), len(ids)) + ids[len(prompt) :]
        mask = [1] * len(ids)
        if pad_to is not None:
            while len(ids) < pad_to:  # repeat the example to fill the sequence
                ids = ids + full[: pad_to - len(ids)]
                labels = labels + full[: pad_to - len(labels)]
                mask = [1] * len(ids)
            ids, labels, mask = ids[:pad_to], labels[:pad_to], mask[:pad_to]
        items.append(
            {
                "input_ids": torch.tensor(ids),
                "attention_mask": torch.tensor(mask),
                "labels": torch.tensor(labels),
            }
        )
    if not items:
        raise ValueError(f"[make_dataset] {path} holds no examples")
    return InstructionData(items)


def _collate(rows: list) -> dict:
    length = max(len(r["input_ids"]) for r in rows)
    batch = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        batch[key] = torch.stack(
            [torch.nn.functional.pad(r[key], (0, length - len(r[key])), value=pad) for r in rows]
        )
    return batch


def load_model(
    recipe: dict, system: str = "halo", lora_dropout: float | None = None, seed: int | None = None
):
    """(model with LoRA adapters, tokenizer) for ``system`` "halo", "bnb" (bitsandbytes + PEFT) or
    "base" (the bound a 4-bit library is measured against: the base left unquantized in the
    compute dtype, PEFT's own LoRA, the rest of the recipe as it is). ``seed`` re-seeds torch right
    before the adapters are created, so all systems start from the same LoRA weights (loading
    consumes the RNG differently)."""
    import peft
    import transformers

    recipe = resolve_dtypes(recipe)
    model_dir = recipe["model"]
    quant = dict(recipe["quantization"])
    lora = dict(recipe["lora"])
    if lora_dropout is not None:
        lora["lora_dropout"] = lora_dropout
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if system == "halo":
        import halo.hf

        config = halo.hf.HaloConfig.from_bnb(quant)
    elif system == "bnb":
        config = transformers.BitsAndBytesConfig(**quant)
    elif system == "base":
        config = None
    else:
        raise ValueError(f"[load_model] system must be 'halo', 'bnb' or 'base', got {system!r}")
    if config is None:
        dtype = getattr(torch, str(quant.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."))
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)
    use_checkpointing = bool(recipe["training"].get("gradient_checkpointing", False))
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_checkpointing)
    lora_config = peft.LoraConfig(**lora)
    if seed is not None:
        torch.manual_seed(seed)
    return peft.get_peft_model(model, lora_config), tokenizer


@dataclass
class Run:
    losses: list
    step_seconds: list
    train_seconds: float


class _Timer:
    """A TrainerCallback (built lazily) recording each step's wall time and loss."""

    def __new__(cls):
        import transformers

        class Timer(transformers.TrainerCallback):
            def __init__(self) -> None:
                self.times: list = []
                self.losses: list = []
                self._start = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self._start)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

        return Timer()


def train(
    model: Any, dataset: Any, recipe: dict, system: str = "halo", callbacks: Any = (), **overrides: Any
) -> Run:
    """Runs transformers' Trainer with the recipe's training section (``overrides`` win) and
    returns the logged losses and the wall time of each step. With ``system="halo"`` an 8-bit
    ``optim`` becomes :class:`halo.optim.PagedAdamW8bit` handed to the Trainer; other systems get
    the Trainer's own (bitsandbytes'). ``callbacks`` are more ``TrainerCallback`` objects."""
    import transformers

    settings = dict(resolve_dtypes(recipe)["training"])
    settings.update(overrides)
    settings.setdefault("report_to", [])
    settings.setdefault("save_strategy", "no")
    settings["use_cpu"] = not torch.cuda.is_available()
    if settings.get("gradient_checkpointing"):
        # Reentrant checkpointing re-runs a layer's backward hooks, which DDP counts as a parameter
        # made ready twice ("marked ready twice"): several processes take the non-reentrant form.
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        settings.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": not distributed})
    optimizers = (None, None)
    if system == "halo" and settings.get("optim") in OPTIMIZERS_8BIT:
        from halo.optim.adamw8bit import PagedAdamW8bit

        settings.pop("optim")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = PagedAdamW8bit(
            params,
            lr=float(settings.get("learning_rate", 5e-5)),
            weight_decay=float(settings.get("weight_decay", 0.0)),
        )
        steps = int(settings["max_steps"])
        sched = transformers.get_scheduler(
            settings.get("lr_scheduler_type", "linear"),
            opt,
            num_warmup_steps=int(settings.get("warmup_steps", 0)),
            num_training_steps=steps,
        )
        optimizers = (opt, sched)
    args = transformers.TrainingArguments(**settings)
    if system == "halo" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _check_distributed(model, args)
    timer = _Timer()
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=_collate,
        optimizers=optimizers,
        callbacks=[timer, *callbacks],
    )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    if any(not math.isfinite(x) for x in timer.losses):
        raise RuntimeError(f"[train] the loss became non-finite: {timer.losses}")
    return Run(timer.losses, timer.times, elapsed)


def _check_distributed(model: Any, args: Any) -> None:
    """One clear line before training when the ranks run different halo versions or store their
    4-bit weights differently, or when accelerate's FSDP plugin (version 1) is to flatten packed
    uint8 weights with float parameters."""
    import halo.hf.distributed

    _ = args.device  # sets up the process group (accelerate's PartialState) if not yet done
    halo.hf.distributed.check_ranks(model)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp and os.environ.get("FSDP_VERSION", "1") == "1":
        halo.hf.distributed.check_fsdp1(model)


def answer(model: Any, tokenizer: Any, instruction: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a chat model to one instruction."""
    prompt = tokenizer(_chat(tokenizer, instruction, None), return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True).strip()
