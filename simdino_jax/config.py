"""The config schema with defaults, and its validation.

``base_config()`` holds every field a recipe may set, with the official SimDINO v1 ViT-B/16 ImageNet-1k values
(docs/methods.md#simdino-recipe) as defaults; the files in ``configs/`` start from it and override. ``validate`` refuses an
invalid config with the field's name before anything is compiled.
"""

from __future__ import annotations

import math

import ml_collections

from simdino_jax import evals, methods, optim, schedules, sharding
from simdino_jax.data import augment
from simdino_jax.data.multicrop import AUGMENT_MODES
from simdino_jax.errors import ConfigError, require
from simdino_jax.losses import gram as gram_lib
from simdino_jax.models.network import ARCHS, DTYPES, backbone_kwargs
from simdino_jax.models.vit import TOKEN_INITS, parse_variant


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "simdino"
  c.seed = 0
  c.batch_size = 512  # global, over all devices and processes
  # Gradient accumulation (train/accumulation.py, docs/training.md#gradient-accumulation): the batch as K micro-batches
  # of batch_size / K in the jitted step, one update per step; K = 1: the plain step.
  c.accumulation_steps = 1
  c.accumulation_mode = "micro"  # micro: batch statistics per micro-batch (a K-device run); exact: the whole batch's
  # Durations: steps win when > 0, else epochs x (train examples // batch_size).
  c.total_steps = 0
  c.total_epochs = 100
  c.warmup_steps = 0
  c.warmup_epochs = 10
  c.log_every = 50
  c.checkpoint_every = 1000  # steps between checkpoints (DIR/checkpoints/); 0: only the one at the end
  c.checkpoint_keep = 3  # newest checkpoints kept on disk (older ones are deleted)
  # Start-up precedence: DIR/checkpoints (resume this run) > resume > init_from > from scratch.
  c.resume = ""  # another run's workdir, checkpoints/ or checkpoints/<step>: its full state, from its step on
  # > 0: resume from this workdir's newest checkpoint at or before this step, moving later ones aside (restarting a
  # run that stopped on a non-finite loss, with other settings); 0: the newest checkpoint.
  c.restart_from_step = 0
  c.init_from = ""  # exported .npz/.safetensors or a workdir: backbone (+ equal-shape heads), step 0, fresh optimizer
  c.eval_every = 0  # 0: evaluate at the end of training only
  # Metrics go to DIR/metrics.jsonl (always), DIR/tensorboard/ (event files, `tensorboard --logdir DIR`) and, when
  # the wandb package is installed and wandb.project is set, Weights & Biases (mode "offline" needs no network).
  c.tensorboard = True
  c.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode="online", tags=()))
  # (name, size) device axes, "data" and optionally "fsdp"; one size may be -1 (all remaining devices). Tuples, so
  # that the command line can override them: --config.mesh='(("data", -1), ("fsdp", 2))'.
  c.mesh = (("data", -1),)

  # Parameter / teacher / optimizer-state shardings (simdino_jax/sharding.py): (regex, rule) pairs matched against
  # leaf names such as "student/backbone/blocks/0/attn/qkv/kernel" (re.fullmatch, first match wins, no match:
  # replicated). "replicate", or "fsdp": split the largest axis divisible by the "fsdp" mesh axis size when the
  # leaf has >= fsdp_min_size elements. Without an "fsdp" mesh axis everything is replicated.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = ((".*", "fsdp"),)
  c.sharding.fsdp_min_size = 2**16

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds:imagenet2012"
  # Labelled data the evaluators read (k-NN, linear, few-shot: its train and test splits); "" = data.source. Without
  # a labelled train and test split the label-based evaluators are off (said once) and training runs unlabelled.
  c.data.eval_source = ""
  c.data.num_global = 2
  c.data.num_local = 10
  c.data.global_size = 224
  c.data.local_size = 96
  c.data.global_scale = (0.4, 1.0)
  c.data.local_scale = (0.05, 0.4)
  c.data.num_workers = 0  # grain worker processes; 0 = in the training process
  # "host": every augmentation on the host (grain); "device": the host only decodes and crops (uint8), flip,
  # colour jitter, greyscale, blur, solarize and normalisation run inside the jitted step (data/device_augment.py).
  c.data.augment_mode = "host"
  c.data.tfds_data_dir = ""  # tfds:NAME sources: TFDS data directory ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  # Photometric recipe (docs/data.md#augmentation-recipe). blur_sigma is an absolute PIL radius in pixels, tuned for 224px crops.
  c.data.augment = ml_collections.ConfigDict(
    dict(
      flip_p=0.5,
      jitter_p=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_p=0.2,
      blur_p=(1.0, 0.1, 0.5),
      blur_sigma=(0.1, 2.0),
      solarize_p=0.2,
      resize="cv2",
    )
  )  # crop resize: "pil" (the official op) or "cv2" (faster; docs/performance.md#data-pipeline)

  c.model = ml_collections.ConfigDict()
  # Backbone: "vit" (model.variant below) or a torchvision ResNet: resnet18 / 34 / 50 / 101, or resnet18_cifar (3x3
  # stride-1 stem, no max-pool; models/resnet.py). A ResNet's feature is its pooled map (no patch tokens).
  c.model.arch = "vit"
  c.model.resnet_width = 0  # ResNet: > 0 overrides the base width (torchvision's 64; e.g. 16 for a CPU miniature)
  c.model.zero_init_residual = False  # ResNet: gamma 0 in each block's last BN (torchvision's default is False)
  # mu, Ti, S, B, L, g  /  patch size. Given on the command line, the variant decides the architecture: the
  # embed_dim / depth / num_heads a recipe set are reset to 0 unless the command line sets them too
  # (apply_command_line); a new patch size needs data.global_size, data.local_size and model.img_size to follow.
  c.model.variant = "B/16"
  c.model.embed_dim = 0  # > 0 overrides the variant's width (likewise depth, num_heads)
  c.model.depth = 0
  c.model.num_heads = 0
  c.model.img_size = 224  # size the stored positional embedding is made for; other sizes interpolate it
  c.model.num_registers = 0
  c.model.layerscale = 0.0  # 0 = no LayerScale; else its init (0.1 SimDINOv2, 1e-5 DINOv2)
  c.model.drop_path_rate = 0.1
  c.model.drop_path_uniform = False  # False: linear over depth (DINO v1); True: every block (DINOv2)
  c.model.token_init = "dino"  # "dino": cls trunc-normal 0.02; "dinov2": normal 1e-6
  c.model.interpolate_offset = 0.1
  c.model.interpolate_antialias = False
  c.model.dtype = "float32"  # compute dtype of the network; params, loss and optimizer stay float32
  # Rematerialise each transformer block in the backward pass (jax.checkpoint): less activation memory, ~1/3 more
  # FLOPs. With a bfloat16 dtype and an "fsdp" mesh axis, sharded parameters are cast before they are gathered.
  c.model.remat = False

  c.head = ml_collections.ConfigDict()
  c.head.hidden_dim = 2048
  c.head.out_dim = 256
  c.head.num_layers = 3
  # DINO family: weight-normalised prototype layer after the (l2-normalised) bottleneck of size out_dim.
  c.head.num_prototypes = 65536
  c.head.norm_last_layer = True  # DINO: g frozen at 1 (unit prototypes); False for DINOv2 / vMF
  c.head.separate_patch_head = False  # masked methods: own head for patch tokens (DINOv2 ibot.separate_head)
  c.head.patch_num_prototypes = 0  # 0: same as num_prototypes
  c.head.use_bn = False  # byol (and dino's predictor): BatchNorm in the MLPs' hidden layer (BYOL's recipe: True)
  c.head.use_bn_in_head = False  # dino: BatchNorm after each hidden Linear of DINO's head (--use_bn_in_head)
  c.head.predictor = False  # dino: BYOL's predictor MLP on the student's head output (DINO Table 14 "+ pred.")
  c.head.predictor_hidden_dim = 4096  # byol / dino's head.predictor: the predictor MLP's hidden width

  # Block masks for the student's global crops (SimDINOv2, DINOv2/iBOT, iBOT-vMF).
  c.masking = ml_collections.ConfigDict()
  c.masking.probability = 0.5  # fraction of global crops masked
  c.masking.ratio = (0.1, 0.5)  # masked-patch ratios spread over this range
  c.masking.min_num_patches = 4  # smallest masked block (DINOv2: 4 patches)

  # DINO-family losses.
  c.dino = ml_collections.ConfigDict()
  c.dino.student_temp = 0.1
  c.dino.teacher_temp = 0.07
  c.dino.warmup_teacher_temp = 0.04
  c.dino.warmup_teacher_temp_epochs = 30
  c.dino.teacher_temp_per = "epoch"  # warm-up indexed by "epoch" (DINO, iBOT) or "iteration" (DINOv2)
  c.dino.center_momentum = 0.9
  c.dino.centering = "centering"  # or "sinkhorn_knopp" (DINOv2 ViT-L/g)
  c.dino.ibot_weight = 1.0
  c.dino.koleo_weight = 0.0  # DINOv2: 0.1
  # KoLeo's row groups: 0 = one per device, as DINOv2 (each GPU's rows, gradients averaged); N = N consecutive groups
  # of the global batch (e.g. the official run's GPU count, to match its per-GPU rows on other hardware).
  c.dino.koleo_groups = 0
  # dino: "ce" (DINO) or "mse" (DINO Table 14 "MSE": BYOL's regression ||s/|s| - t/|t|||^2 between the student's and
  # the centred teacher's head outputs, over DINO's cross-view pairs).
  c.dino.loss = "ce"

  # moco_v2 (facebookresearch/moco builder.py; head.out_dim is its dim, 128 in the recipe).
  c.moco = ml_collections.ConfigDict()
  c.moco.queue_size = 65536  # K negatives; a multiple of the keys enqueued per step (batch_size, x2 if symmetric)
  c.moco.temperature = 0.2  # InfoNCE T (MoCo-v2's --moco-t 0.2; builder.py's default 0.07 is v1's)
  c.moco.symmetric = False  # False: query view 1, key view 2 (MoCo-v2); True: both directions averaged

  # swav (facebookresearch/swav main_swav.py's defaults; head: hidden_dim 2048 -> out_dim 128, K = num_prototypes).
  c.swav = ml_collections.ConfigDict()
  c.swav.temperature = 0.1  # student softmax temperature (--temperature)
  c.swav.epsilon = 0.05  # Sinkhorn-Knopp regularisation (--epsilon)
  c.swav.sinkhorn_iterations = 3  # (--sinkhorn_iterations)
  c.swav.crops_for_assign = (0, 1)  # crops whose codes are targets (--crops_for_assign)
  c.swav.queue_length = 0  # global queue of past embeddings, a multiple of batch_size; 0: none (--queue_length)
  c.swav.queue_start_epoch = 15.0  # epoch from which the queue is filled (--epoch_queue_starts)
  c.swav.freeze_prototypes_iters = 313  # prototypes held during the first iterations (--freeze_prototypes_niters)

  c.vmf = ml_collections.ConfigDict()
  c.vmf.terms = 1  # terms of the Bessel uniform asymptotic expansion (1 = the DINO-vMF paper)

  c.loss = ml_collections.ConfigDict()
  c.loss.eps = math.sqrt(0.05)  # paper convention; official eps 0.05 = this squared
  c.loss.gamma_rule = "official"  # official: 1/p + 1/B; paper: Remark C.3; fixed: loss.gamma
  c.loss.gamma = 0.0
  c.loss.exclude_same_view = True  # official; the paper's eq. (22) keeps the same-view pairs
  c.loss.expansion = "mean"  # official expa_type=1; "student" is the paper's
  c.loss.groups = 1  # 1: one covariance over the global batch (official reduce_cov=1)
  c.loss.regularizer = "coding_rate"  # Table 5 ablations: infonce, uniformity, barlow (weight reg_weight)
  c.loss.reg_weight = 1.0
  # SimDINOv2: "paper" eq. (42) (patch term / N over all crops), "official" (cls + patch, no 1/2, 1/masked count per
  # crop over all crops) or "masked_mean" (1/2 (cls + patch), patch term averaged over masked crops only).
  c.loss.patch_weighting = "paper"

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4  # per 256 images (lr_scaling linear_256)
  c.optim.lr_scaling = "linear_256"
  c.optim.min_lr = 1e-6
  c.optim.warmup_from_min_lr = False
  c.optim.warmup_start_lr = 0.0  # lr at warm-up step 0 (SwAV's --start_warmup; not rescaled); 0: DINO / DINOv2
  # "linspace" (DINO / DINOv2: base reached at warm-up step W-1) or "step_over_warmup" (the SimDINOv2 fork: at W).
  c.optim.warmup_rule = "linspace"
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4
  c.optim.clip_grad = 3.0
  c.optim.clip_mode = "per_tensor"  # per_tensor (DINO v1), global, per_module (DINOv2: backbone / head separately)
  c.optim.layer_decay = 1.0  # DINOv2: 0.9 (lr x decay^(depth + 1 - layer id))
  c.optim.patch_embed_lr_mult = 1.0  # DINOv2: 0.2
  c.optim.freeze_last_layer_epochs = 0.0  # DINO: 1 (prototype layer not updated during the first epoch)
  # Frozen prototypes: "drop_grads" (DINO v1 / iBOT: AdamW skips them, moments untouched) or "zero_lr" (DINOv2: lr 0,
  # moments accumulate); optim.FREEZE_MODES.
  c.optim.freeze_mode = "drop_grads"
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.adam_eps = 1e-8
  c.optim.name = "adamw"  # main_dino --optimizer: adamw, sgd (torch.optim.SGD), lars (DINO's utils.LARS); larc (apex)
  c.optim.momentum = 0.9  # sgd / lars momentum (main_dino.py's SGD(momentum=0.9), LARS's default 0.9)
  c.optim.lars_eta = 0.001  # LARS trust coefficient eta (DINO utils.LARS / BYOL / SwAV's LARC: 0.001)
  c.optim.lars_exclude_1d = True  # DINO's LARS: 1-D tensors (biases, norm/BN scales) not rescaled; False: every tensor
  c.optim.weight_decay_all = False  # True: decay every parameter (torch.optim.SGD(model.parameters()): MoCo, SwAV)
  c.optim.larc_eps = 1e-8  # apex LARC's eps in eta ||p|| / (||g|| + wd ||p|| + eps) (trust coefficient: lars_eta)
  c.optim.larc_clip = False  # apex LARC's clip: ratio min(eta ||p|| / (...) / lr, 1); SwAV: False (scaling mode)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.momentum = 0.996
  c.teacher.momentum_end = 1.0
  c.teacher.self_distillation = True  # False: the teacher is the current student at every step (paper's ablation)

  # Distillation (train/distill.py, docs/training.md#distillation): a frozen teacher's outputs are the targets of a
  # smaller student; state.teacher stays the student's EMA (what the evaluators read), as DINOv2 / DINOv3 distil.
  c.distill = ml_collections.ConfigDict()
  c.distill.enabled = False  # True: distil from distill.teacher
  c.distill.teacher = ""  # a workdir / checkpoint dir of ours (its EMA teacher), an export with heads, official weights
  c.distill.teacher_config = ""  # the teacher's model + head blocks when the file has none: configs/*.py or .json
  c.distill.mask_student = False  # masked methods: False = unmasked student crops, patch loss kept (DINOv3's code)

  # Gram anchoring (DINOv3; train/gram.py, docs/methods.md#gram-anchoring-in-training): weight x MSE between the
  # Gram matrices of the student's normed patch tokens of the global crops and a frozen Gram teacher's (a snapshot of
  # the EMA teacher's backbone). Scale-free defaults: DINOv3's ViT-7B values
  # (dinov3/configs/train/dinov3_vit7b16_gram_anchor.yaml).
  c.gram = ml_collections.ConfigDict()
  c.gram.enabled = False  # True: add the term (methods with patch tokens: simdino, simdinov2, dinov2, ibot_vmf)
  c.gram.weight = 1.0  # loss_weight, used when weight_schedule is empty
  c.gram.weight_schedule = ()  # (start, peak, end, warmup steps, cosine steps); ViT-7B: (0, 0, 2, 1000000, 1000)
  c.gram.img_level = True  # one N x N Gram per image (ViT-7B); False: per device's batch (DINOv3's default)
  c.gram.negatives = "keep"  # losses/gram.py NEGATIVES: keep, remove, teacher, teacher_intended
  c.gram.normalize = True  # l2-normalise the patch features first
  c.gram.tokens_used = "all"  # all, masked, unmasked (the student's masked patches; needs img_level False)
  c.gram.start_step = 0  # EMA teacher copied in before this step, term off before (it_load_ema_teacher)
  c.gram.first_refresh = 0  # refreshes after step s when s + 1 >= this (it_first_update; ViT-7B 1010000) ...
  c.gram.refresh_every = 10000  # ... and (s + 1) % this == 0 (update_frequency; 0: never refreshed)
  c.gram.max_refreshes = 3  # at most this many (max_updates; 0: unlimited)
  c.gram.teacher = ""  # gram.ckpt: a workdir / checkpoint dir / weights file whose backbone is the first Gram teacher
  c.gram.crop_size = 0  # crops.gram_teacher_crops_size: the global crops' boxes and flips at this size, undistorted
  c.gram.resize_antialias = False  # global_teacher_resize_antialias of the bicubic resize to the student's patch grid

  # Feature extraction shared by every evaluator: eval batch (global) and image size (0: the global crop size).
  # dtype: the frozen backbone's compute dtype in every evaluation (training's rounds and evaluate.py), whatever
  # model.dtype trained in: "float32" as DINO's evaluation scripts, or "bfloat16" (faster, not the papers' setting).
  c.eval = ml_collections.ConfigDict(dict(batch_size=256, image_size=0, dtype="float32"))
  # Evaluators (simdino_jax/evals/, docs/evaluation.md): config.evals.NAME = {type, every, final, at_init, ...}.
  # every: steps between runs during training (-1: eval_every, 0: not during training); final: run on the final
  # teacher (DIR/eval/NAME.json); at_init: also on the initial network (reported as *_at_init). The k-NN (DINO's
  # weighted vote, top-1/top-5 at k and for every k of ks) runs at init, every eval_every steps and at the end; the
  # others run during training only when their `every` is set, and on any checkpoint through evaluate.py.
  c.evals = ml_collections.ConfigDict()
  c.evals.knn = evals.declare("knn", every=-1, final=True, at_init=True)
  c.evals.linear = evals.declare("linear")
  c.evals.fewshot = evals.declare("fewshot")
  c.evals.attention = evals.declare("attention")
  c.evals.davis = evals.declare("davis")
  c.evals.segmentation = evals.declare("segmentation")
  c.evals.retrieval = evals.declare("retrieval")
  c.evals.maskcut = evals.declare("maskcut")
  c.evals.transfer = evals.declare("transfer")  # the nine transfer datasets (evals/transfer.py); on request
  c.evals.finetune = evals.declare("finetune")  # full fine-tuning, BEiT/iBOT or DeiT recipe (evals/finetune.py); off
  return c


EVAL_DTYPES = ("float32", "bfloat16")  # config.eval.dtype
ARCHITECTURE_FIELDS = ("embed_dim", "depth", "num_heads")  # config.model fields that override the variant's
# Tuple fields of a fixed length (a command-line "--config.data.global_scale=0.5" is a 1-tuple): what each entry is.
FIXED_TUPLES = {
  "data.global_scale": (2, "(min, max) area fraction"),
  "data.local_scale": (2, "(min, max) area fraction"),
  "data.augment.blur_p": (3, "(global crop 1, global crop 2, local crops) probabilities"),
  "data.augment.blur_sigma": (2, "(min, max) radius in pixels"),
  "masking.ratio": (2, "(min, max) masked fraction"),
}
# Sizes in pixels that must hold whole patches: they change together with model.variant's patch size.
PATCH_SIZED = ("data.global_size", "data.local_size", "model.img_size")


def apply_command_line(config: ml_collections.ConfigDict, overrides) -> list[str]:
  """Apply the precedence rules of values given on the command line (``overrides``: the dotted fields set there)
  to ``config`` in place; returns one note per rule that changed the config.

  A command-line ``model.variant`` decides the architecture: the embed_dim / depth / num_heads a recipe set beside
  its own variant (the demo's 96 / 4 / 3 beside "mu/4") are reset to 0, the variant's own values, unless the command
  line sets them too. Reset rather than refused, because naming a variant means that network: keeping the recipe's
  numbers built a network other than the one the log names (``--config.model.variant=S/4`` on the demo printed
  S/4 and built the demo's 454,080 parameters), and refusing would turn every variant change on a small recipe
  into a four-flag command. Without a command-line variant nothing changes, so every recipe resolves as written."""
  overrides = set(overrides)
  if "model.variant" not in overrides:
    return []
  try:
    variant = parse_variant(config.model.variant)
  except ValueError:
    return []  # validate names model.variant
  reset = [f for f in ARCHITECTURE_FIELDS if config.model.get(f, 0) and f"model.{f}" not in overrides]
  changed = [f"{f}={config.model[f]}" for f in reset if config.model[f] != variant[f]]
  for field in reset:
    config.model[field] = 0
  if not changed:
    return []
  return [
    f"config.model.variant={config.model.variant!r} from the command line decides the architecture: the recipe's "
    f"model.{', model.'.join(changed)} reset to the variant's (set them on the command line to keep them)"
  ]


def _one_of(value, options: tuple, field: str) -> None:
  """``value`` must be one of ``options``, the list the module that uses the field owns."""
  require(value in options, field, f"must be one of {', '.join(map(repr, options))}, got {value!r}")


def validate(
  config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1, num_local_devices: int | None = None
) -> None:
  """Raise ConfigError naming the field for anything that would fail (or silently misbehave) later.

  ``num_local_devices`` (this process's devices) defaults to num_devices // num_processes."""
  _validate_structure(config)
  require(
    config.method in methods.METHODS,
    "method",
    f"unknown method {config.method!r}; choose one of {sorted(methods.METHODS)}",
  )
  require(config.batch_size > 0, "batch_size", f"must be positive, got {config.batch_size}")
  require(
    config.batch_size % num_devices == 0,
    "batch_size",
    f"{config.batch_size} is not divisible by the {num_devices} devices",
  )
  require(
    config.batch_size % num_processes == 0,
    "batch_size",
    f"{config.batch_size} is not divisible by the {num_processes} processes",
  )
  local = num_local_devices if num_local_devices is not None else max(num_devices // num_processes, 1)
  per_process = config.batch_size // num_processes
  require(
    per_process % local == 0,
    "batch_size",
    f"{config.batch_size} over {num_processes} processes gives {per_process} examples per process, "
    f"not divisible by its {local} local devices",
  )
  require(
    config.total_steps > 0 or config.total_epochs > 0,
    "total_steps",
    "set total_steps or total_epochs to a positive value",
  )
  require(config.log_every > 0, "log_every", f"must be positive, got {config.log_every}")
  require(config.eval_every >= 0, "eval_every", f"must be >= 0, got {config.eval_every}")
  require(config.checkpoint_keep >= 1, "checkpoint_keep", f"must be >= 1, got {config.checkpoint_keep}")
  require(
    isinstance(config.restart_from_step, int) and config.restart_from_step >= 0,
    "restart_from_step",
    f"must be a step >= 0 (0: the newest checkpoint), got {config.restart_from_step!r}",
  )
  for field in ("resume", "init_from"):
    require(
      isinstance(config.get(field, ""), str),
      field,
      f"must be a path (a workdir, a checkpoint directory or an exported file), got {config.get(field)!r}",
    )
  require(
    isinstance(config.model.get("remat", False), bool),
    "model.remat",
    f"must be True or False, got {config.model.get('remat')!r}",
  )

  require(
    bool(config.data.source),
    "data.source",
    "not set: give the training data as folder:PATH, npz:PATH, tfds:NAME or digits (your photos: "
    "--config=configs/own_images.py:/path/to/photos; the CIFAR-10 recipes take "
    "--config=configs/cifar10_<method>.py:/path/to/cifar10.tar or $SIMDINO_CIFAR10; make the tar with "
    "launch/prepare_data.sh cifar10 https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz /path/to/cifar10.tar)",
  )
  sizes = [size for _, size in config.mesh]
  require(
    all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1,
    "mesh",
    f"axis sizes must be positive with at most one -1, got {config.mesh}",
  )
  fixed = math.prod(s for s in sizes if s > 0)
  require(
    num_devices % fixed == 0 and (-1 in sizes or fixed == num_devices),
    "mesh",
    f"{config.mesh} does not fit {num_devices} devices",
  )
  names = [name for name, _ in config.mesh]
  require(
    len(set(names)) == len(names) and all(n in sharding.MESH_AXES for n in names),
    "mesh",
    f"axis names must be distinct, each 'data' or 'fsdp' (sharding.MESH_AXES), got {names}",
  )
  require(
    isinstance(config.sharding.fsdp_min_size, int) and config.sharding.fsdp_min_size >= 0,
    "sharding.fsdp_min_size",
    f"must be an integer >= 0, got {config.sharding.fsdp_min_size!r}",
  )
  sharding.compile_rules(config.sharding.rules)  # ConfigError naming config.sharding.rules[i]

  _validate_arch(config)
  try:
    variant = parse_variant(config.model.variant)
  except ValueError as e:
    raise ConfigError(f"config.model.variant: {e}") from None
  patch = variant["patch_size"]
  d = config.data
  _validate_patch_sizes(config, patch)
  require(
    d.num_global in (1, 2), "data.num_global", f"the DINO recipe defines one or two global crops, got {d.num_global}"
  )
  require(d.num_local >= 0, "data.num_local", f"must be >= 0, got {d.num_local}")
  for field in ("global_scale", "local_scale"):
    lo, hi = d[field]
    require(0 < lo <= hi <= 1, f"data.{field}", f"need 0 < min <= max <= 1, got {d[field]}")
  require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
  _one_of(d.augment_mode, AUGMENT_MODES, "data.augment_mode")
  _one_of(d.augment.get("resize", "cv2"), augment.RESIZE_BACKENDS, "data.augment.resize")
  require(
    isinstance(d.tfds_data_dir, str),
    "data.tfds_data_dir",
    f"must be a directory path (or '' for $TFDS_DATA_DIR), got {d.tfds_data_dir!r}",
  )
  _one_of(config.model.dtype, tuple(DTYPES), "model.dtype")
  require(
    0.0 <= config.model.drop_path_rate < 1.0,
    "model.drop_path_rate",
    f"must be in [0, 1), got {config.model.drop_path_rate}",
  )
  _one_of(config.model.token_init, TOKEN_INITS, "model.token_init")
  require(
    config.head.out_dim > 0 and config.head.hidden_dim > 0 and config.head.num_layers >= 1,
    "head",
    "out_dim, hidden_dim must be positive and num_layers >= 1",
  )

  # The method's own fields (config.loss, config.dino, config.vmf, config.masking, head.num_prototypes ...).
  methods.get_method(config.method).validate(config, num_devices=num_devices)

  o = config.optim
  require(o.lr >= 0 and o.min_lr >= 0, "optim.lr", "lr and min_lr must be >= 0")
  _one_of(o.lr_scaling, optim.LR_SCALINGS, "optim.lr_scaling")
  _one_of(o.clip_mode, optim.CLIP_MODES, "optim.clip_mode")
  _one_of(o.get("warmup_rule", "linspace"), schedules.WARMUP_RULES, "optim.warmup_rule")
  _one_of(o.get("freeze_mode", "drop_grads"), optim.FREEZE_MODES, "optim.freeze_mode")
  _one_of(o.get("name", "adamw"), optim.OPTIMIZERS, "optim.name")
  require(0.0 <= o.get("momentum", 0.9) < 1.0, "optim.momentum", f"must be in [0, 1), got {o.get('momentum', 0.9)}")
  require(o.get("lars_eta", 0.001) > 0, "optim.lars_eta", f"must be positive, got {o.get('lars_eta', 0.001)}")
  start = o.get("warmup_start_lr", 0.0)
  require(start >= 0, "optim.warmup_start_lr", f"must be >= 0, got {start}")
  require(
    not (start > 0 and o.get("warmup_from_min_lr", False)),
    "optim.warmup_start_lr",
    f"{start} conflicts with optim.warmup_from_min_lr=True (the warm-up starts at min_lr): set one",
  )
  larc_eps, larc_clip = o.get("larc_eps", 1e-8), o.get("larc_clip", False)
  require(
    isinstance(larc_eps, (int, float)) and not isinstance(larc_eps, bool) and larc_eps >= 0,
    "optim.larc_eps",
    f"must be a number >= 0, got {larc_eps!r}",
  )
  require(isinstance(larc_clip, bool), "optim.larc_clip", f"must be True or False, got {larc_clip!r}")
  require(
    0 < o.layer_decay <= 1 and o.patch_embed_lr_mult > 0,
    "optim.layer_decay",
    "layer_decay must be in (0, 1] and patch_embed_lr_mult positive",
  )
  require(
    0.0 <= config.teacher.momentum <= 1.0 and 0.0 <= config.teacher.momentum_end <= 1.0,
    "teacher.momentum",
    "momentum and momentum_end must be in [0, 1]",
  )
  _validate_eval(config, patch, depth=backbone_kwargs(config.model)["depth"], num_devices=num_devices)
  _validate_distill(config)
  _validate_gram(config)
  _validate_accumulation(config, num_devices)


DISTILL_METHODS = ("simdino", "simdinov2", "dino", "dinov2")  # config.distill: the methods with a frozen-teacher path


def _validate_distill(config: ml_collections.ConfigDict) -> None:
  """config.distill's own fields; what needs the teacher's files (its head, patch size) is train/distill.py's."""
  dist = config.get("distill")
  if dist is None or not dist.enabled:
    return
  require(
    isinstance(dist.teacher, str) and bool(dist.teacher),
    "distill.teacher",
    "not set: the frozen teacher's workdir, exported file (with --with_head) or official weights",
  )
  require(
    config.method in DISTILL_METHODS,
    "method",
    f"distillation (config.distill.enabled) is built for {', '.join(DISTILL_METHODS)}, got {config.method!r}",
  )
  require(
    config.model.get("arch", "vit") == "vit",
    "model.arch",
    f"distillation trains ViTs (the step does not run the student's EMA, whose BatchNorm statistics would then never "
    f"update), got {config.model.arch!r}",
  )


GRAM_METHODS = ("simdino", "simdinov2", "dinov2", "ibot_vmf")  # config.gram: the methods with patch features


def _validate_gram(config: ml_collections.ConfigDict) -> None:
  """config.gram's fields (train/gram.py)."""
  g = config.get("gram")
  if g is None or not g.enabled:
    return
  _one_of(config.method, GRAM_METHODS, "method")
  require(config.model.get("arch", "vit") == "vit", "model.arch", "Gram anchoring needs a ViT's patch tokens")
  require(g.weight >= 0, "gram.weight", f"must be >= 0, got {g.weight}")
  sched = tuple(g.weight_schedule)
  require(len(sched) in (0, 5), "gram.weight_schedule", f"need () or (start, peak, end, warmup, cosine), got {sched}")
  if sched:
    require(
      all(float(v) >= 0 for v in sched[:3]) and int(sched[3]) == sched[3] >= 0 and int(sched[4]) == sched[4] >= 1,
      "gram.weight_schedule",
      f"need weights >= 0, warmup steps >= 0 and cosine steps >= 1, got {sched}",
    )
  _one_of(g.negatives, gram_lib.NEGATIVES, "gram.negatives")
  _one_of(g.tokens_used, gram_lib.TOKENS_USED, "gram.tokens_used")
  if g.tokens_used != "all":
    require(not g.img_level, "gram.tokens_used", f"{g.tokens_used!r} needs gram.img_level=False (as in DINOv3)")
    require(
      methods.get_method(config.method).uses_masks,
      "gram.tokens_used",
      f"{g.tokens_used!r} needs a method with masks, not {config.method!r}",
    )
  for field in ("start_step", "first_refresh", "refresh_every", "max_refreshes"):
    require(int(g[field]) == g[field] >= 0, f"gram.{field}", f"must be an integer >= 0, got {g[field]}")
  teacher = g.get("teacher", "")
  require(isinstance(teacher, str), "gram.teacher", f"must be a path (or empty), got {teacher!r}")
  size = g.get("crop_size", 0)
  if size:
    patch = backbone_kwargs(config.model)["patch_size"]
    require(
      int(size) == size > 0 and size % patch == 0,
      "gram.crop_size",
      f"must be 0 or a positive multiple of the patch size {patch}, got {size}",
    )
    require(
      config.data.augment_mode == "host",
      "gram.crop_size",
      "the Gram teacher's crops are built in data.augment_mode='host' only (the device augmentation has no third "
      "crop stream)",
    )


ACCUMULATION_MODES = ("micro", "exact")  # config.accumulation_mode (train/accumulation.py)
ACCUMULATION_QUEUES = ("moco_v2", "swav")  # a queue of the batch's keys: K micro-batch enqueues cannot be averaged
EXACT_ACCUMULATION_METHODS = ("simdino", "simdinov2", "dino", "dinov2")  # losses of per-row, batch-first outputs


def _validate_accumulation(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """config.accumulation_steps / accumulation_mode: the micro-batches split every device's rows evenly, and the
  batch-level terms the chosen mode handles (train/accumulation.py)."""
  k, mode = config.get("accumulation_steps", 1), config.get("accumulation_mode", "micro")
  require(isinstance(k, int) and k >= 1, "accumulation_steps", f"must be an integer >= 1, got {k!r}")
  _one_of(mode, ACCUMULATION_MODES, "accumulation_mode")
  if k == 1:
    return
  require(
    config.batch_size % (k * num_devices) == 0,
    "accumulation_steps",
    f"{k} micro-batches do not split each of the {num_devices} devices' {config.batch_size // num_devices} "
    f"examples evenly (batch_size={config.batch_size})",
  )
  require(
    config.method not in ACCUMULATION_QUEUES,
    "accumulation_steps",
    f"method {config.method!r} enqueues the batch's keys once per step; accumulation is not built for it",
  )
  for block in ("distill", "gram"):
    require(
      not config.get(block, {}).get("enabled", False),
      "accumulation_steps",
      f"does not combine with config.{block}.enabled yet (the accumulated step has no {block} path)",
    )
  micro = config.batch_size // k
  if mode == "exact":
    require(
      config.method in EXACT_ACCUMULATION_METHODS,
      "accumulation_mode",
      f"'exact' is built for {', '.join(EXACT_ACCUMULATION_METHODS)}, got {config.method!r}; use 'micro'",
    )
    require(
      config.model.get("arch", "vit") == "vit",
      "accumulation_mode",
      f"'exact' needs per-row network outputs; {config.model.arch!r} has BatchNorm: use 'micro'",
    )
    return
  # micro: every per-batch group of the loss lies inside one micro-batch
  if config.method in ("simdino", "simdinov2"):
    require(
      micro % config.loss.groups == 0,
      "loss.groups",
      f"{config.loss.groups} must divide the micro-batch of {micro} (batch_size / accumulation_steps)",
    )
  if config.method in ("dino", "dinov2") and config.dino.koleo_weight > 0:
    groups = config.dino.get("koleo_groups", 0) or num_devices
    require(
      micro % groups == 0 and micro // groups >= 2,
      "dino.koleo_groups",
      f"{groups} groups must split the micro-batch of {micro} (batch_size / accumulation_steps) into >= 2 rows each",
    )


# Evaluators that read only the backbone's pooled feature ("cls"): the ones a ResNet backbone can run.
POOLED_FEATURE_EVALUATORS = ("knn", "linear", "fewshot", "retrieval")


def _validate_arch(config: ml_collections.ConfigDict) -> None:
  """config.model.arch and what a ResNet backbone cannot do: patch masks (the masked methods) and the evaluators that
  read patch tokens or attention (each refused in one line naming it)."""
  arch = config.model.get("arch", "vit")
  _one_of(arch, ARCHS, "model.arch")
  if arch == "vit":
    return
  width = config.model.get("resnet_width", 0)
  require(isinstance(width, int) and width >= 0, "model.resnet_width", f"must be 0 or a positive width, got {width!r}")
  require(
    config.method not in methods.METHODS or not methods.get_method(config.method).uses_masks,
    "model.arch",
    f"{arch!r} has no patch tokens to mask; method {config.method!r} masks patches (use a ViT, or a method "
    "without masks: simdino, dino, ...)",
  )
  for name, cfg in config.get("evals", {}).items():
    kind = cfg.get("type") if hasattr(cfg, "get") else None
    enabled = kind is not None and (cfg.get("every", 0) != 0 or cfg.get("final") or cfg.get("at_init"))
    require(
      not enabled or kind not in evals.TYPES or kind in POOLED_FEATURE_EVALUATORS,
      f"evals.{name}",
      f"the {kind!r} evaluator reads a ViT's patch tokens or attention, which model.arch={arch!r} does not have "
      f"(a ResNet runs {', '.join(POOLED_FEATURE_EVALUATORS)}); turn it off (every=0, final=False, at_init=False)",
    )


def _get(config: ml_collections.ConfigDict, field: str):
  for key in field.split("."):
    config = config[key]
  return config


def _validate_structure(config: ml_collections.ConfigDict) -> None:
  """The shapes of tuple-valued fields, before anything unpacks them (a command-line "--config.mesh=foo" is the
  1-tuple ("foo",))."""
  mesh = config.mesh
  require(
    isinstance(mesh, (tuple, list))
    and len(mesh) >= 1
    and all(
      isinstance(axis, (tuple, list)) and len(axis) == 2 and isinstance(axis[0], str) and isinstance(axis[1], int)
      for axis in mesh
    ),
    "mesh",
    "expected (name, size) pairs, e.g. --config.mesh='((\"data\", -1),)' or "
    f"--config.mesh='((\"data\", -1), (\"fsdp\", 2))', got {mesh!r}",
  )
  for field, (length, meaning) in FIXED_TUPLES.items():
    value = _get(config, field)
    if not (
      isinstance(value, (tuple, list))
      and len(value) == length
      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
      default = tuple(_get(base_config(), field))
      raise ConfigError(
        f"config.{field}: expected {length} numbers, {meaning}, e.g. --config.{field}='{default}', got {value!r}"
      )


def _validate_patch_sizes(config: ml_collections.ConfigDict, patch: int) -> None:
  """Every size in pixels that must hold whole patches, named together when one does not: a patch-size change
  (``--config.model.variant=S/16`` on a 16 px / 8 px recipe) needs them changed at once."""
  sizes = {field: _get(config, field) for field in PATCH_SIZED}
  bad = [field for field, size in sizes.items() if not (isinstance(size, int) and size > 0 and size % patch == 0)]
  if not bad:
    return
  suggested = " ".join(f"--config.{f}={max(1, -(-s // patch)) * patch}" for f, s in sizes.items() if f in bad)
  kept = [f"{f}={s}" for f, s in sizes.items() if f not in bad]
  eval_size = config.eval.image_size
  raise ConfigError(
    f"config.{bad[0]}: {sizes[bad[0]]} is not a positive multiple of the patch size {patch} "
    f"(model.variant={config.model.variant!r}); the sizes that hold whole patches ({', '.join(PATCH_SIZED)}) "
    f"change together with the patch size, e.g. {suggested}"
    + (f" (keeping {', '.join(kept)})" if kept else "")
    + (f"; eval.image_size={eval_size} too" if eval_size and eval_size % patch else "")
  )


def _validate_eval(config: ml_collections.ConfigDict, patch: int, depth: int, num_devices: int = 1) -> None:
  e = config.eval
  require(e.batch_size >= 1, "eval.batch_size", f"must be positive, got {e.batch_size}")
  _one_of(e.get("dtype", "float32"), EVAL_DTYPES, "eval.dtype")
  require(
    e.image_size == 0 or (e.image_size > 0 and e.image_size % patch == 0),
    "eval.image_size",
    f"must be 0 (the global crop size) or a positive multiple of the patch size {patch}, got {e.image_size}",
  )
  evals.validate(config, patch=patch, depth=depth, num_devices=num_devices)


def from_dict(stored: dict) -> ml_collections.ConfigDict:
  """The config a run stored (DIR/config.json, or the copy saved with each checkpoint) over ``base_config()``: fields
  the stored run did not have keep their defaults; fields this version no longer has are dropped (listed in
  ``config.unknown_fields`` is not kept: the returned config validates like any recipe)."""
  config = base_config()

  def merge(target: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
      if key not in target:
        continue  # a field of another version of the schema
      if isinstance(target[key], ml_collections.ConfigDict) and isinstance(value, dict):
        merge(target[key], value, f"{prefix}{key}.")
      elif isinstance(target[key], ml_collections.ConfigDict):
        continue
      else:
        current = target[key]
        target[key] = (
          tuple(tuple(v) if isinstance(v, list) else v for v in value)
          if isinstance(value, list) and isinstance(current, tuple)
          else value
        )

  merge(config, stored, "")
  return config
