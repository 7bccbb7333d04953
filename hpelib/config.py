"""Typed, validated configuration of a workbook run, and its named profiles (STYLE.md 4, 5).

One `Config` holds a section per stage. The dataclass defaults describe the `default` profile:
the embedded study on a 2-core CPU. `PROFILES` shrink or grow it by dotted overrides
(`"rank": 16`), so a profile is a short, readable list of what differs.

Every field is checked in `__post_init__`; a bad value raises `ValueError` naming the field, the
value and what is allowed, so a notebook fails at its first cell with a message a person can act on.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

DOMAINS = ("synth-train", "synth-aflw", "synth-biwi")
BACKENDS = ("tiny", "qwen2_vl", "cogvlm")


# --------------------------------------------------------------------------- validation helpers
def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer")


def _non_negative_int(name: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, value, "an integer >= 0")


def _fraction(name: str, value: Any, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and ((0 < value <= 1) if open_low else (0 <= value <= 1))
    _check(ok, name, value, "in (0, 1]" if open_low else "in [0, 1]")


def _positive(name: str, value: Any) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, name, value, "a positive number")


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, name, value, f"one of {list(allowed)}")


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """SynthHeads rendering and the optional real datasets (`00_prepare_data`)."""

    image_size: int = 128  # px; the tiny VLM sees 8 x 8 patches of 16 px (16 image tokens); ~700 renders/s on 2 cores
    n_train: int = 4000  # synth-train scenes on disk (training also renders fresh ones on the fly)
    n_test: int = 300  # scenes per test domain: +-2.5 deg standard error on a ~25 deg MAE
    train_domain: str = "synth-train"
    test_domains: list[str] = field(default_factory=lambda: list(DOMAINS))  # synth-train = held-out scenes
    seed: int = 0
    # Real datasets (empty: not used). Roots of the published layouts, never modified.
    root_300wlp: str = ""
    root_aflw2000: str = ""
    biwi_npz: str = ""
    skip_bad_files: bool = False  # skip (and count) corrupt files instead of failing on the first

    def __post_init__(self) -> None:
        _check(isinstance(self.image_size, int) and 32 <= self.image_size <= 1024 and self.image_size % 16 == 0,
               "image_size", self.image_size, "a multiple of 16 in [32, 1024]")
        _positive_int("n_train", self.n_train)
        _positive_int("n_test", self.n_test)
        _one_of("train_domain", self.train_domain, DOMAINS)
        _check(isinstance(self.test_domains, list) and len(self.test_domains) > 0, "test_domains",
               self.test_domains, f"a non-empty list drawn from {list(DOMAINS)}")
        for d in self.test_domains:
            _one_of("test_domains", d, DOMAINS)
        _non_negative_int("seed", self.seed)


@dataclass
class ModelConfig:
    """Which VLM: the embedded tiny one, or a hub model by id (real world)."""

    backend: str = "tiny"
    model_id: str = ""  # hub id or local folder for qwen2_vl / cogvlm; unused by tiny
    trust_remote_code: bool = False  # CogVLM needs it; never on unless you set it
    dtype: str = "float32"  # float32 on CPU; bfloat16 on GPU
    device: str = "auto"  # auto: cuda when available, else cpu
    tokenizer_id: str = ""  # cogvlm only: its tokenizer's hub id or folder ("" = lmsys/vicuna-7b-v1.5)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    load_in_4bit: bool = False  # QLoRA-style NF4 base weights (bitsandbytes, CUDA); hub backends only
    tiny_spec: dict = field(default_factory=dict)  # tiny backend only: `TinySpec` fields replacing its defaults,
    # e.g. {"stem": "conv", "angle_circle": 5} (hpelib.backends.tiny; docs/tiny_backend.md). A new base

    def __post_init__(self) -> None:
        _one_of("backend", self.backend, BACKENDS)
        _one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _one_of("device", self.device, ("auto", "cpu", "cuda"))
        if self.backend != "tiny":
            _check(bool(self.model_id), "model_id", self.model_id,
                   f"a hub id or local folder when model.backend is {self.backend!r}")
        for name in ("trust_remote_code", "gradient_checkpointing", "load_in_4bit"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        _check(isinstance(self.tokenizer_id, str), "tokenizer_id", self.tokenizer_id, "a hub id or folder (a string)")
        _check(not (self.load_in_4bit and self.backend == "tiny"), "load_in_4bit", self.load_in_4bit,
               "false for the tiny backend (4-bit loading is for pretrained hub models)")
        _check(isinstance(self.tiny_spec, dict), "tiny_spec", self.tiny_spec, "a dict of TinySpec fields")
        if self.tiny_spec:
            _check(self.backend == "tiny", "tiny_spec", self.tiny_spec,
                   f"empty when model.backend is {self.backend!r} (the default profile sets it for the tiny VLM: "
                   f"start from --profile gpu, real or quick, or set model.tiny_spec to {{}})")
            from hpelib.backends.tiny import spec_from_fields  # transformers: imported only when asked

            spec_from_fields(self.tiny_spec, "tiny_spec")  # a clear error now rather than when the base is built


VISION_TARGETS = ("boxes", "dense")  # base.vision_targets: see hpelib.vision_pretrain


@dataclass
class TrainConfig:
    """One training stage: base pre-training (all weights) or LoRA fine-tuning."""

    minutes: float = 20.0  # wall-clock budget; training stops at whichever of minutes/steps comes first
    max_steps: int = 100_000
    batch_size: int = 32
    grad_accum: int = 1  # 32 x 1 = 32 samples per optimiser step
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_every: int = 250  # steps between held-out evaluations
    eval_samples: int = 64
    checkpoint_every: int = 250
    seed: int = 0
    processes: int = 1  # data-parallel processes (torchrun) on the CPU's cores, `batch_size` split among
    # them, each with its share of the threads; base only (adapters train side by side: `lora.workers`).
    # On 2 cores, 2 processes made 1.17x the steps of one before the fast encoding, 1.03x after.
    angle_sigma: float = 0.0  # > 0: an angle token's target spreads over its neighbours, a Gaussian of this
    # many degrees (hpelib.soft_targets); 0: the model's own one-hot cross-entropy. Whole-number tokenizers only
    box_sigma: float = 0.0  # the same for box values, in units of the 0-999 grid
    angle_weight: float = 1.0  # each angle's token (after ` yaw:` ` pitch:` ` roll:` ` tilt:`) counts this many
    # times another labelled token in the loss (a weighted mean); whole-number tokenizers only
    vision_minutes: float = 0.0  # base only: > 0 first trains the vision tower this long with a temporary
    # regression head on pose-free targets (hpelib.vision_pretrain), then `minutes` of the curriculum
    vision_steps: int = 0  # base only: the vision stage ends after this many steps or `vision_minutes`,
    # whichever comes first; 0: `max_steps`, as for the curriculum (the stage's limit before this field)
    vision_targets: str = "boxes"  # what that temporary head predicts: "boxes" (V1: the head's, the face
    # parts' and the objects' boxes from all tokens at once) or "dense" (V2: per token, what is centred in
    # its cell: the head's box and 68 landmarks, an object's box, colour, shape and axis)
    freeze_vision: bool = False  # base only, with vision_minutes > 0: the curriculum leaves the pre-trained
    # tower as it is and trains its mergers (the projector) and the language model, as LLaVA does
    prefetch: bool = True  # render the next batches in a background process while the model trains
    # (hpelib.data.prefetch): the same batches, ~15 % faster base steps on 2 cores. Adapters (side by side,
    # every core busy) set it false
    prefetch_workers: int = 1  # processes rendering ahead when `prefetch`: more where cores are many and the
    # model's step is fast (a GPU), where one cannot keep up. The same batches whatever the number
    autocast_bf16: bool = False  # forward passes under torch.autocast in bfloat16 (weights and optimiser stay
    # float32): CPUs with AVX512-BF16 or AMX, and GPUs. The tiny VLM's LoRA step on one core: 0.60 -> 0.51 s,
    # language-only 0.51 -> 0.32 (docs/tiny_backend.md, "A step twice as cheap"). Held-out checks run unchanged.
    # For a base, the curriculum only (0.38 -> 0.27 s a step with the tower frozen, B16); the tower's own stage
    # stays float32, where autocast made the conv-stem tower's step 20 % slower
    object_pose: float = 0.0  # base only: > 0 adds cube poses in the head-pose answer's words (`Locate the red
    # cube and give its pose.` -> `[[box]] yaw:.. pitch:.. roll:..`) to the curriculum at this weight beside
    # tasks.BASE_MIX's (which sum to 1): a base that has written ` yaw:` ` pitch:` ` roll:`, never a head's angle
    mix: dict[str, float] = field(default_factory=dict)  # base only: the curriculum's task weights (task name
    # -> weight, e.g. {"box": 0.4, "box_object": 0.2, "orient": 0.2, "colour": 0.1, "count": 0.1}, hpelib.data
    # .tasks.TASKS); {}: tasks.BASE_MIX. `object_pose` adds its weight beside these
    lora_plus_ratio: float = 1.0  # LoRA only: LoRA's B matrices learn at this many times `lr` (LoRA+, Hayou
    # et al. 2024: B's best step is larger than A's); 1: one learning rate for both, plain LoRA

    def __post_init__(self) -> None:
        _positive("minutes", self.minutes)
        _check(isinstance(self.autocast_bf16, bool), "autocast_bf16", self.autocast_bf16, "true or false")
        _check(isinstance(self.prefetch, bool), "prefetch", self.prefetch, "true or false")
        _positive_int("prefetch_workers", self.prefetch_workers)
        _check(isinstance(self.freeze_vision, bool), "freeze_vision", self.freeze_vision, "true or false")
        _check(self.vision_targets in VISION_TARGETS, "vision_targets", self.vision_targets,
               f"one of {VISION_TARGETS} (hpelib.vision_pretrain)")
        _check(not self.freeze_vision or self.vision_minutes > 0, "freeze_vision", self.freeze_vision,
               "false unless vision_minutes > 0: a tower frozen without pre-training stays random")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_samples", "checkpoint_every"):
            _positive_int(name, getattr(self, name))
        _positive("lr", self.lr)
        _positive("lora_plus_ratio", self.lora_plus_ratio)
        _positive("angle_weight", self.angle_weight)
        _check(isinstance(self.object_pose, (int, float)) and not isinstance(self.object_pose, bool)
               and self.object_pose >= 0, "object_pose", self.object_pose, "a number >= 0 (0: no cube poses)")
        _non_negative_int("warmup_steps", self.warmup_steps)
        _non_negative_int("vision_steps", self.vision_steps)
        _check(isinstance(self.mix, dict) and all(isinstance(k, str) and isinstance(w, (int, float))
                                                  and not isinstance(w, bool) and w >= 0 for k, w in self.mix.items())
               and (not self.mix or sum(self.mix.values()) > 0), "mix", self.mix,
               "{} or task name -> weight >= 0 with a positive sum, e.g. {\"box\": 0.6, \"orient\": 0.4}")
        _check(not self.vision_steps or self.vision_minutes > 0, "vision_steps", self.vision_steps,
               "0 unless vision_minutes > 0: it limits the base's vision stage, which adapters never have")
        _check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay",
               self.weight_decay, "a number >= 0")
        _positive("max_grad_norm", self.max_grad_norm)
        _non_negative_int("seed", self.seed)
        _positive_int("processes", self.processes)
        for name in ("angle_sigma", "box_sigma", "vision_minutes"):
            _check(isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0, name,
                   getattr(self, name), "a number >= 0 (0: off)")
        _check(self.batch_size % self.processes == 0, "batch_size", self.batch_size,
               f"a multiple of processes ({self.processes}): each process takes an equal share")


@dataclass
class LoraConfig:
    """LoRA fine-tuning on head pose (`02_train_lora`)."""

    rank: int = 8
    alpha: int = 16  # scaling alpha / rank = 2
    dropout: float = 0.05
    target_language: bool = True  # LoRA on the language model's attention and MLP projections
    target_vision: bool = True  # and on the vision tower, as CogVLM's own LoRA demo does
    target_projector: bool = False  # and on the projector that hands the tower's features to the language
    # model (Qwen-VL's patch merger, Qwen3-VL's deepstack mergers too; CogVLM's GLU adapter)
    adapters: dict[str, float] = field(default_factory=lambda: {"hpe": 0.0, "hpe_rehearsal": 0.2})
    # adapter name -> rehearsal ratio: the fraction of grounding samples in each batch
    workers: int = 2  # adapters trained at once, each in its own process with its share of the CPU
    # threads (hpelib.parallel); 1: one after another in the notebook's process (the GPU profiles)
    # 4 min per adapter, the two side by side on one core each: ~150 steps, what 3 min on both cores
    # gave one adapter (3.5 min gave 110 steps and 82 % of the head boxes, README "Time"); held-out
    # checks every 75 steps on 32 samples per task, since on one core they cost a fifth of the budget.
    # A LoRA on a from-scratch toy model takes a larger step than on pretrained weights (gpu: 1e-4). 5e-3:
    # with 2e-3 the adapter's head boxes ranged from 46 to 100 % across bases (its format came late on
    # some); 5e-3 gave 97-100 % on three bases (docs/tiny_backend.md, "LoRA learning rate")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(minutes=4.0, lr=5e-3, warmup_steps=20,
                                                                   eval_every=75, eval_samples=32,
                                                                   prefetch=False))

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = _build_section("train", TrainConfig, self.train)
        _positive_int("rank", self.rank)
        _positive_int("workers", self.workers)
        _check(self.train.processes == 1, "train.processes", self.train.processes,
               "1: the notebooks train adapters side by side with lora.workers instead (for data-parallel "
               "LoRA, run `accelerate launch --multi_gpu --num_processes N -m hpelib.train lora` yourself)")
        for name in ("target_language", "target_vision", "target_projector"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        _check(self.train.vision_minutes == 0, "train.vision_minutes", self.train.vision_minutes,
               "0: vision pre-training is a stage of the base (base.vision_minutes), not of an adapter")
        _positive("alpha", self.alpha)
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        _check(self.target_language or self.target_vision or self.target_projector,
               "target_language/target_vision/target_projector",
               (self.target_language, self.target_vision, self.target_projector), "at least one True")
        _check(isinstance(self.adapters, dict) and len(self.adapters) > 0, "adapters", self.adapters,
               "a non-empty dict of adapter name -> rehearsal ratio")
        for name, ratio in self.adapters.items():
            _check(isinstance(name, str) and name.isidentifier(), "adapters name", name, "an identifier")
            _check(isinstance(ratio, (int, float)) and 0 <= ratio < 1, f"adapters[{name!r}]", ratio, "in [0, 1)")


@dataclass
class MergeConfig:
    """The merges built by `04_merge` (DESIGN.md "The merge methods")."""

    ta_lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0])
    ties_density: float = 0.2  # fraction of each dW's entries kept (TIES paper default 0.2)
    dare_density: float = 0.5  # keep probability of DARE's random drop
    merge_seed: int = 0
    # The tiny from-scratch model's LoRA moves a layer far more than a 17 B model's does (1 - cos(W0,
    # W0 + dW) is 0.01-0.17 in runs/default against ~1e-4 at CogVLM scale), so every threshold of the
    # paper's scale claims every layer. This grid spans the tiny model's range: 0.9 claims ~1/6 of the
    # layers, 0.95 ~1/2, 0.98 ~5/6, 0.999 all (the paper-scale setting). The gpu/real profiles use
    # the paper-scale grid.
    wta_thresholds: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.98, 0.999])
    wta_reference: str = "base"  # base: cos(W0, W0 + dW); pairwise: adapters against each other
    wta_granularity: str = "module"  # module: per linear layer; block: per transformer block
    methods: list[str] = field(default_factory=lambda: ["task_arithmetic", "ties", "dare_linear", "wta_cosine"])

    def __post_init__(self) -> None:
        for lam in self.ta_lambdas:
            _positive("ta_lambdas", lam)
        _fraction("ties_density", self.ties_density, open_low=True)
        _fraction("dare_density", self.dare_density, open_low=True)
        _non_negative_int("merge_seed", self.merge_seed)
        for t in self.wta_thresholds:
            _fraction("wta_thresholds", t, open_low=True)
        _one_of("wta_reference", self.wta_reference, ("base", "pairwise"))
        _one_of("wta_granularity", self.wta_granularity, ("module", "block"))


@dataclass
class BaselineConfig:
    """The 6DRepNet-style CNN and MediaPipe baselines (`hpelib.baselines`; trained in `02_train_lora`,
    evaluated in `05_evaluate`)."""

    cnn: bool = True  # train the CNN on the same training domain, with the LoRA stage's budget
    cnn_converged_minutes: float = 5.0  # > 0: also train one to convergence (early stopping), this long at most;
    # the same run gives cnn6d@budget (its weights when the LoRA budget ran out), so this is the CNN's whole cost
    cnn_image_size: int = 64  # px of the head crops (6DRepNet uses 224 on real data)
    cnn_batch_size: int = 32
    mediapipe: bool = True  # evaluate MediaPipe's FaceLandmarker when the [peers] extra is installed

    def __post_init__(self) -> None:
        _check(isinstance(self.cnn_converged_minutes, (int, float)) and self.cnn_converged_minutes >= 0,
               "cnn_converged_minutes", self.cnn_converged_minutes, "a number >= 0 (0: not trained)")
        _check(isinstance(self.cnn_image_size, int) and 32 <= self.cnn_image_size <= 256,
               "cnn_image_size", self.cnn_image_size, "an integer in [32, 256]")
        _positive_int("cnn_batch_size", self.cnn_batch_size)


@dataclass
class EvalConfig:
    """`05_evaluate`: how many samples, how answers are generated and scored."""

    n_samples: int = 100  # scenes per domain (at most data.n_test), each asked 2-3 prompts: 11 variants x 3
    # domains x ~275 prompts, ~3 min of generation with two workers on 2 cores
    batch_size: int = 32
    workers: int = 2  # variants evaluated at once, each worker process with its share of the CPU threads
    max_new_tokens: int | None = None  # None: 1.5 x the longest reference answer in the backend's tokens, + 1
    invalid_penalty_deg: float = 90.0  # MAE_all: an invalid answer counts as this error per angle
    max_abs_angle: float = 99.0  # AFLW2000 protocol: drop test samples with any |angle| above

    def __post_init__(self) -> None:
        _positive_int("n_samples", self.n_samples)
        _positive_int("batch_size", self.batch_size)
        _positive_int("workers", self.workers)
        if self.max_new_tokens is not None:
            _positive_int("max_new_tokens", self.max_new_tokens)
        _positive("invalid_penalty_deg", self.invalid_penalty_deg)
        _positive("max_abs_angle", self.max_abs_angle)


@dataclass
class Config:
    """A whole run: the profile it came from plus every stage's section."""

    profile: str = "default"
    seed: int = 0
    angle_decimals: int = 0  # decimals of the angles in answers (integer degrees by default)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # 1300 steps (what 20 min gave before the steps got faster: 1307; ~15 min on 2 quiet cores now), or
    # 20 min on a slower or busier machine. Head grounding emerges between steps 600 and 1000; shorter
    # bases were measured whole (docs/tiny_backend.md, README "Time"): 1129 steps grounded 94 % of the
    # test heads, 928 steps 86 %, and their hpe_rehearsal adapters (lr 2e-3) 68 % / 46 % of the boxes.
    base: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1300))
    lora: LoraConfig = field(default_factory=LoraConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build_section(name, cls, value))
        _one_of("profile", self.profile, tuple(PROFILES))
        _check(self.base.lora_plus_ratio == 1, "base.lora_plus_ratio", self.base.lora_plus_ratio,
               "1: a base trains every weight, it has no LoRA B matrices (lora.train.lora_plus_ratio)")
        _check(self.lora.train.object_pose == 0, "lora.train.object_pose", self.lora.train.object_pose,
               "0: it weighs a task of the base curriculum (base.object_pose); an adapter's mix is set by "
               "its rehearsal ratio")
        _check(not self.lora.train.mix, "lora.train.mix", self.lora.train.mix,
               "{}: it weighs the base curriculum's tasks (base.mix); an adapter's mix is set by its rehearsal ratio")
        _non_negative_int("seed", self.seed)
        _check(self.angle_decimals in (0, 1, 2), "angle_decimals", self.angle_decimals, "0, 1 or 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self, *sections: str) -> str:
        """A short stable hash of the named sections (all when none), for caching stages."""
        d = self.to_dict()
        payload = {k: d[k] for k in sections} if sections else d
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _build_section(name: str, cls: type, values: dict):
    """Build a section from a dict; a bad value's error names its full dotted key."""
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{name}.{e}") from None
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "base": TrainConfig, "lora": LoraConfig,
             "merge": MergeConfig, "eval": EvalConfig, "baselines": BaselineConfig}

# --------------------------------------------------------------------------- profiles
# DC1's base (docs/tiny_backend.md, "Dense vision targets" and "Adapters with many more steps"): a
# conv-stem tower pre-trained alone on dense pose-free targets, then frozen, and the angle tokens' rows
# on a circle; since the fourteenth session with cube poses in the curriculum, so the base has written
# ` yaw:` ` pitch:` ` roll:` ("A base that has written the pose's words"). The `default` and `pose`
# profiles share it, so one cached base serves both.
DC1_BASE: dict[str, Any] = {
    "base.object_pose": 0.1,  # ~3 of 32 samples a batch; the adapters' field names: p 0.04-0.05 -> ~1
    # six decoder layers since the nineteenth session (four before; 3.4 M parameters on the language side
    # instead of 2.5): over the same curriculum 65 % of 300 held-out object prompts against 62 %, the
    # smallest 48 % against 31 %; its 8-min adapters 12-25 % fewer steps, the same pose (7.1 / 7.2 deg on
    # 300 held-out scenes, four layers 7.2 / 7.3) (docs/tiny_backend.md, "Six decoder layers as the default")
    "model.tiny_spec": {"stem": "conv", "angle_circle": 5, "layers": 6},
    # the tower's stage: 2600 steps (~13 min on 2 cores; 15 min a ceiling), not the curriculum's 1300 (~7 min then):
    # on 600 held-out scenes its own head then finds 81 % of the object cells (64 %), 76 % of their boxes
    # (67 %), and a linear map reads the pose from its landmarks to 9.7 deg (12.8) (docs/tiny_backend.md,
    # "A tower trained twice as long")
    "base.vision_steps": 2600,
    "base.vision_minutes": 15,
    # the curriculum (docs/tiny_backend.md, "Objects listed"): the head 20 %, one object asked 40 %, every
    # object listed and boxed (box_list) 20 %; on 300 held-out prompts objects 46 %, where the objects asked
    # 40 % of the time and no list gave 33 % (OA) and tasks.BASE_MIX (30 % each) 24 %; adapters no worse
    "base.mix": {"box": 0.4, "box_object": 0.2, "box_list": 0.2, "orient": 0.1, "colour": 0.05, "count": 0.05},
    "base.vision_targets": "dense",
    "base.freeze_vision": True,
    # The curriculum's objects grow with its steps: 1300 steps 46 % of 300 held-out prompts, 2000 52-57 %,
    # 2800 61 % (docs/tiny_backend.md, "Binding the words"). Under bf16 autocast (the curriculum only: the
    # tower's stage stays float32) a step costs ~29 % less with the same objects at 2000 steps (B16), so
    # 2600 steps take about what 2000 did in float32 (~12-15 min on 2 quiet cores). The workbook's runs:
    # four layers 2541 steps within the ceiling below, objects 62 %, the adapters' pose unchanged ("2600
    # curriculum steps under bf16 autocast"); six layers 2441 steps, 65 %
    "base.autocast_bf16": True,
    "base.max_steps": 2600,
    "base.minutes": 17,  # a ceiling, so the base stays within 30 min (the tower's ~13 + 17) on a slow host
}

# Dotted overrides on the defaults above. Comments say why a number is what it is.
PROFILES: dict[str, dict[str, Any]] = {
    # The CPU study the README reports, with adapters that learn head pose within 8 minutes
    # (docs/tiny_backend.md, "A step twice as cheap"): DC1's base, a conv-stem tower pre-trained on
    # dense pose-free targets and then frozen, circular angle rows (~30 min, then cached; the same
    # base key as `pose`), and adapters with the cheaper step: LoRA on the language model and the
    # projector, not the tower, no LoRA dropout, bf16 autocast (~950-1080 steps in 8 min on the six-layer
    # base, ~1200-1350 on the four-layer one, side by side on one core each), with soft angle targets
    # (sigma 6 deg) weighted 5x, lr 7e-3.
    "default": {
        **DC1_BASE,
        "lora.target_vision": False,  # the tower is frozen and pre-trained; its LoRA costs 60 % more a step
        "lora.dropout": 0.0,  # the dropout masks were 13 % of a step
        "lora.train.autocast_bf16": True,
        # G4 (900 steps, two seeds) and 8-min CPU adapters scored on 300 held-out scenes: the projector's
        # LoRA with soft angle targets 10.8 deg, either alone 12.9 (sigma 6) / 12.0-13.0 (projector, G4),
        # neither 12.7-13.1; sigma 3 and 10 did less than 6; LoRA+ no better (docs/tiny_backend.md)
        "lora.target_projector": True,
        "lora.train.angle_sigma": 6.0,
        # with those, 8-min CPU adapters on 300 held-out scenes: lr 5e-3 10.6 deg, 7e-3 10.5 / 10.5 (two
        # seeds), 1e-2 10.8 / 11.8, 1.5e-2 diverged (27 deg in its check). Without them (G3, hard targets,
        # 900 steps): 5e-3 12.7, 1e-2 11.9, 2e-2 19.6
        "lora.train.lr": 7e-3,
        # the angles' tokens weighted in the loss, on the 300 scenes (seeds 0 / 1): on DC1's base 3x 9.5 / 9.6
        # deg where unweighted gave 10.2-10.7 / 11.7 ("Attention that costs less"); on this base, whose field
        # names cost nothing, 3x 9.6 / 9.2, 5x 8.8 / 8.9, 8x 8.9 / 9.0 ("A base that has written the pose's words")
        "lora.train.angle_weight": 5.0,
        "lora.train.minutes": 8.0,
        "lora.train.eval_every": 250,  # a held-out check costs ~2 s: four in a run
    },
    # The dataclass defaults alone: the plain ViT tower, no vision pre-training, 4-min adapters. The
    # default before the eleventh session (~28 min with its base, ~7 without); its adapters answer in
    # the format with the right head box but one constant pose (docs/tiny_backend.md).
    "quick": {},
    # CI: every stage runs for real on tiny sizes; the whole workbook in a few minutes on 2 cores.
    "smoke": {
        "data.image_size": 64,
        "data.n_train": 64,
        "data.n_test": 16,  # 16 scenes per domain: enough to exercise every metric, not to measure
        "base.minutes": 2.0,  # a ceiling: the step counts bound smoke training, so a busy CPU changes nothing
        "base.max_steps": 20,
        "base.batch_size": 8,
        "base.object_pose": 0.1,  # the default's curriculum task, so CI trains and scores it
        "base.warmup_steps": 2,
        "base.eval_every": 10,
        "base.eval_samples": 8,
        "base.checkpoint_every": 10,
        "lora.train.minutes": 1.0,
        "lora.train.max_steps": 10,
        "lora.train.batch_size": 8,
        "lora.train.warmup_steps": 2,
        "lora.train.eval_every": 5,
        "lora.train.eval_samples": 8,
        "baselines.cnn_converged_minutes": 0.25,  # both CNN rows from one 15 s run
        "lora.train.checkpoint_every": 5,
        "merge.ta_lambdas": [1.0],
        "merge.wta_thresholds": [0.9999],
        "eval.n_samples": 8,  # 8 scenes x 3 prompts x 3 domains x 7 variants: ~500 short generations
        "eval.batch_size": 8,
    },
    # The default's base with the earlier adapter settings (language + vision LoRA, dropout 0.05, fp32,
    # lr 5e-3) for 40 min each, side by side (~1900 steps): adapters that learn the pose with smaller
    # updates, which task arithmetic and TIES merge without breaking the format (docs/tiny_backend.md,
    # "Adapters with many more steps"). About 70 min on 2 cores with the base, 50 without.
    "pose": {
        **DC1_BASE,
        "lora.train.minutes": 40.0,
        "lora.train.eval_every": 250,
    },
    # One 80 GB GPU and a pretrained hub VLM: Qwen2-VL-2B-Instruct natively (for the paper's CogVLM see
    # docs/real_backends.md: -p model.backend cogvlm, its own environment, batch 4 x accum 8).
    "gpu": {
        "model.backend": "qwen2_vl",
        "lora.workers": 1,  # one GPU: one adapter, one evaluation at a time
        "eval.workers": 1,
        "model.model_id": "Qwen/Qwen2-VL-2B-Instruct",
        "model.dtype": "bfloat16",  # bf16 weights and activations: half the memory of fp32, no loss scaling
        "model.device": "auto",  # cuda when present; the same profile still runs (slowly) on a CPU
        "model.gradient_checkpointing": True,  # activations of 28 layers x 300 tokens x 16 samples fit easily
        "data.image_size": 448,  # 448 px = 16x16 patches of 28 px after Qwen2-VL's 2x2 merger: 256 image tokens
        "base.max_steps": 1,  # pretrained: the base is only measured, never trained
        "lora.rank": 16,
        "lora.alpha": 32,
        "lora.target_vision": False,  # language model only: the vision tower already grounds
        "lora.train.minutes": 240.0,
        "lora.train.batch_size": 16,  # ~300 tokens/sample; a 2B model in bf16 (4.4 GB) leaves ~70 GB
        "lora.train.grad_accum": 2,  # 16 x 2 = 32 samples per optimiser step, as on CPU
        "lora.train.lr": 1e-4,  # pretrained weights: 50x smaller than the CPU study's from-scratch LoRA (5e-3)
        "lora.train.warmup_steps": 50,
        "lora.train.eval_every": 500,
        "lora.train.checkpoint_every": 500,
        "eval.n_samples": 2000,  # all of AFLW2000 after the |angle| <= 99 filter (1969 images)
        "merge.wta_thresholds": [0.999, 0.9999, 0.99999],  # pretrained weights: LoRA moves layers little
        "eval.batch_size": 32,  # generation: KV cache of 32 x ~350 tokens is small beside the weights
    },
    # The paper's protocol on real data: train on 300W-LP, test on AFLW2000 and BIWI, on one GPU.
    # Point the roots at the published layouts (never modified), e.g.
    #   -p data.root_300wlp /data/300W_LP -p data.root_aflw2000 /data/AFLW2000 -p data.biwi_npz /data/BIWI_noTrack.npz
    # Left empty, 00_prepare_data stops and names the parameter to set.
    "real": {
        "model.backend": "qwen2_vl",
        "lora.workers": 1,  # one GPU: one adapter, one evaluation at a time
        "eval.workers": 1,
        "model.model_id": "Qwen/Qwen2-VL-2B-Instruct",
        "model.dtype": "bfloat16",
        "model.device": "auto",
        "model.gradient_checkpointing": True,
        "data.image_size": 448,
        "data.root_300wlp": "",  # 300W_LP/ (122,450 .jpg + .mat, incl. flipped)
        "data.root_aflw2000": "",  # AFLW2000/ (2,000 .jpg + .mat)
        "data.biwi_npz": "",  # one .npz of face crops + [yaw, pitch, roll] (FSA-Net's BIWI preprocessing)
        "base.max_steps": 1,
        "lora.rank": 16,
        "lora.alpha": 32,
        "lora.target_vision": False,
        "lora.train.minutes": 480.0,  # ~1 epoch of 300W-LP at 32 samples/step
        "lora.train.max_steps": 4000,  # 4000 x 32 = 128k samples ~ one pass over 300W-LP
        "lora.train.batch_size": 16,
        "lora.train.grad_accum": 2,
        "lora.train.lr": 1e-4,
        "lora.train.warmup_steps": 100,
        "lora.train.eval_every": 500,
        "lora.train.checkpoint_every": 500,
        "eval.n_samples": 2000,  # whole test sets: AFLW2000 1969 after the filter; BIWI is capped here
        "merge.wta_thresholds": [0.999, 0.9999, 0.99999],  # pretrained weights: LoRA moves layers little
        "eval.batch_size": 32,
    },
}


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            raise ValueError(f"unknown config key {key!r}: no section {'.'.join(parts[:i + 1])!r}; "
                             f"sections are {sorted(k for k, v in d.items() if isinstance(v, dict))}")
        node = node[part]
    if parts[-1] not in node:
        raise ValueError(f"unknown config key {key!r}; known keys here: {sorted(node)}")
    node[parts[-1]] = copy.deepcopy(value)


def make_config(profile: str = "default", overrides: dict[str, Any] | None = None) -> Config:
    """The configuration of a profile with dotted overrides applied, validated.

    Args:
        profile: a name in `PROFILES`.
        overrides: `{"rank": 16, "wta_thresholds": [0.999]}`; `None` values are ignored,
            so a notebook can pass its parameters straight through.

    Raises:
        ValueError: unknown profile or key, or a value outside what the field allows.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    d = Config().to_dict()
    given = {k: v for k, v in (overrides or {}).items() if v is not None}  # None: keep the profile's
    for key, value in {**PROFILES[profile], **given}.items():
        _set_dotted(d, key, value)
    d["profile"] = profile
    return config_from_dict(d)


def config_from_dict(d: dict) -> Config:
    """Rebuild (and validate) a `Config` from `to_dict()` output, e.g. a run's `config.json`."""
    return Config(**copy.deepcopy(d))
