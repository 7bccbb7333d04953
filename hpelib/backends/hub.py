"""Helpers shared by the backends that load a pretrained VLM by hub id or local folder.

Where a model comes from (`resolve_source`), how it is loaded (`from_pretrained_kwargs`: safetensors
only, never remote code unless asked, 4-bit on request), errors that name the model and say what
to do (`load_error`), device and dtype choice, padding, and how LoRA target expressions combine.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Source:
    """Where a model is read from: `ref` is what `from_pretrained` gets; `local` says whether it is
    a folder on disk (then nothing is fetched: `local_files_only=True`)."""

    ref: str
    local: bool

    def describe(self) -> str:
        return f"local folder {self.ref!r}" if self.local else f"hub id {self.ref!r}"


def resolve_source(model_id: str | os.PathLike) -> Source:
    """A hub id (`org/name`) or a local folder; a path-like string that is not a folder is an error.

    Raises:
        FileNotFoundError: `model_id` looks like a path (`/`, `./`, `../`, `~`) but is not a folder.
        ValueError: empty `model_id`.
    """
    ref = str(model_id).strip()
    if not ref:
        raise ValueError("model.model_id is empty: set it to a hub id (e.g. Qwen/Qwen2-VL-2B-Instruct) "
                         "or a local folder, e.g. -p model.model_id /models/Qwen2-VL-2B-Instruct")
    path = Path(ref).expanduser()
    if path.is_dir():
        return Source(str(path), local=True)
    if ref.startswith(("/", "./", "../", "~", ".\\")) or path.suffix in (".safetensors", ".bin"):
        raise FileNotFoundError(f"model folder {ref!r} does not exist (model.model_id must be a hub id "
                                "like org/name or an existing folder holding config.json and *.safetensors)")
    return Source(ref, local=False)


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process (`HF_HUB_OFFLINE=1`)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes")


def load_error(what: str, source: Source, exc: BaseException) -> OSError:
    """An `OSError` that names what failed to load, from where, why, and what to do next."""
    msg = f"could not load the {what} from {source.describe()}: {type(exc).__name__}: {exc}"
    if source.local:
        msg += ("\nThe folder must hold what save_pretrained writes (config.json, *.safetensors, the "
                "processor/tokenizer files). Only safetensors weights are read; convert .bin checkpoints first.")
    else:
        msg += ("\nHub ids need network access to huggingface.co (or the files already in the local cache). "
                + ("HF_HUB_OFFLINE is set, so nothing is downloaded. " if hub_offline() else "")
                + "Without hub access (as on the machine this project is developed on), download the model "
                f"elsewhere (`huggingface-cli download {source.ref} --local-dir DIR`) and pass the folder: "
                "-p model.model_id DIR")
    return OSError(msg)


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` -> cuda when available, else cpu. A bare `"cuda"` under `accelerate launch` /
    `torchrun` is this process's GPU (`LOCAL_RANK`), so data-parallel replicas load onto their own card."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A `torch.dtype`; `None` picks bfloat16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def from_pretrained_kwargs(source: Source, *, dtype: torch.dtype, device: torch.device,
                           load_in_4bit: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments for `*.from_pretrained`: safetensors only, weights placed straight on
    `device` (`device_map`), remote code only when the caller passes it on, NF4 on request.

    Raises:
        ValueError: 4-bit asked for without bitsandbytes or without CUDA.
    """
    kwargs: dict[str, Any] = dict(use_safetensors=True, trust_remote_code=bool(trust_remote_code),
                                  local_files_only=source.local, device_map={"": str(device)})
    kwargs[_dtype_key()] = dtype
    if load_in_4bit:
        if not bitsandbytes_available():
            raise ValueError("model.load_in_4bit is true but bitsandbytes is not installed "
                             "(pip install bitsandbytes), or set -p model.load_in_4bit false")
        if device.type != "cuda":
            raise ValueError(f"model.load_in_4bit needs a CUDA device, got {device}; set -p model.load_in_4bit false")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
    return kwargs


def _dtype_key() -> str:
    """transformers >= 4.56 calls it `dtype`; the older stack CogVLM's remote code needs, `torch_dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing, with input embeddings that require grad so a frozen base plus
    LoRA still back-propagates through the checkpointed blocks."""
    # transformers 5 renamed it activation checkpointing; the CogVLM stack (4.4x) has the old name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False


def join_regex(parts: list[str]) -> str:
    """One PEFT `target_modules` expression (matched with `re.fullmatch` on full module names)."""
    if not parts:
        raise ValueError("lora_target_modules needs language=True, vision=True or projector=True")
    return "|".join(f"(?:{p})" for p in parts)


def pad(seqs: list[torch.Tensor], value: int | float, side: str = "right") -> torch.Tensor:
    """Stack 1-D tensors of different lengths into `(B, max_len)`, padding on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if side == "left":
        return torch.nn.utils.rnn.pad_sequence([s.flip(0) for s in seqs], batch_first=True,
                                               padding_value=value).flip(1)
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


@torch.no_grad()
def greedy_generate(backend, samples: list, max_new_tokens: int, image_key: str, eos_id: int) -> list[str]:
    """Greedy answers of a decoder-only hub VLM (KV cache on), batched with left padding; the
    prompt is cut off. `image_key` names the batch entry holding the pixels (cast to the model's
    dtype); the model's training mode is restored afterwards."""
    from hpelib.backends.base import Sample

    if not samples:
        return []
    model = backend.model
    was_training = model.training
    model.eval()
    batch = backend.collate([backend.encode(Sample(s.image, s.prompt, None, s.task)) for s in samples],
                            padding_side="left")
    batch = {k: v.to(backend.device) for k, v in batch.items()}
    batch[image_key] = batch[image_key].to(backend.dtype)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         use_cache=True, pad_token_id=backend.pad_id, eos_token_id=eos_id)
    if was_training:
        model.train()
    new = out[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in backend.tokenizer.batch_decode(new, skip_special_tokens=True)]
