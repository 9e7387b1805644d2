"""The offline default: Hydra on the bundled pre-trained ViT-S/14, Fashion-MNIST, VTAB-1k protocol.

  python train.py --config configs/default.py --workdir /tmp/hydra_default

800 training + 200 validation images from Fashion-MNIST's train split (VTAB-1k's train800 and
val200, the validation carved at 90% of train: the held-out phase; the paper's final runs train
on all 1,000, train800val200), test accuracy of the merged model on the
test split. Sized to finish in about 10 minutes on 2 CPU cores: 112 px (8x8 patches of 14 px),
a 2,000-image test subset (see README for why these choices).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def adapter_config(kind: str, **fields) -> ml_collections.ConfigDict:
  """Every adapter field; None (a typed placeholder) means the kind's default (AdapterSpec)."""
  a = ml_collections.ConfigDict()
  a.kind = kind  # "hydra" | "lora" | "sequential" | "hydralora" | "none"
  a.targets = placeholder(tuple)  # regexes over layer paths (fullmatch)
  a.rank = placeholder(int)  # LoRA / sequential / HydraLoRA rank
  a.rank_parallel = placeholder(int)  # Hydra: rank of the branch on the layer input
  a.rank_sequential = placeholder(int)  # Hydra: rank of the branch on the layer output
  a.scale = placeholder(float)  # Hydra / sequential: s, shared by both branches
  a.alpha = placeholder(float)  # LoRA / HydraLoRA: update scaled by alpha / rank
  a.bias = placeholder(bool)  # factor biases (Hydra's official code has them)
  a.dropout = 0.0  # inside each branch; > 0 trains through the activation-level path
  a.num_heads = 3  # HydraLoRA: number of B heads
  a.top_k = placeholder(int)  # HydraLoRA: route to the k largest weights only
  a.balance_weight = 0.0  # HydraLoRA: Switch-style load-balancing loss weight
  a.update(fields)
  return a


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for params, adapters, data order and dropout

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = "default"  # "default" (bundled ViT-S/14), a checkpoint path, or "random"
  c.model.variant = "S/14"  # size used when checkpoint is "random" (or None)
  c.model.overrides = ml_collections.ConfigDict()  # extra ViT fields for random models
  c.model.image_size = 112  # input resolution; position embeddings are resampled once at load
  c.model.pool = "tok+gap"  # class token and mean patch token, concatenated (DINOv2 probe style)
  c.model.pre_logits = True  # keep a checkpoint's tanh pre_logits layer (original i21k files)
  c.model.pixel_mean = placeholder(tuple)  # input normalisation; None: what the checkpoint says
  c.model.pixel_std = placeholder(tuple)
  c.model.dtype = "float32"  # compute dtype ("bfloat16" on GPU/TPU); params stay float32
  c.model.attention = "auto"  # cuDNN flash attention on GPUs with bf16 compute, else "xla"
  c.model.remat = "none"  # "block": recompute blocks (least memory); "dots": keep matmul outputs
  c.model.drop_path = 0.0  # stochastic depth of the last block (rising from 0), training only
  c.model.head_init = "zeros"  # a fresh head: "zeros" (big_vision) or "torch" (nn.Linear's)
  c.model.reset_head = False  # True: a fresh head even where the checkpoint's has num_classes

  # Hydra on every block's attention out projection and MLP Dense_1, rank 2 + 2 (the paper's).
  c.adapter = adapter_config("hydra")  # r=2+2, s=1 (AdapterSpec defaults)

  c.train_patterns = ("head/.*",)  # params that train besides the adapters (fullmatch regexes)
  # start from these adapters (and the trained params they carry, e.g. the head) instead of fresh
  # ones: a hydra_jax export/adapters.safetensors or a PEFT LoRA directory; their spec replaces
  # config.adapter
  c.init_adapters = placeholder(str)

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist_offline"  # tfds name, or "folder:/root" (root/<split>/<class>/*)
  c.data.data_dir = placeholder(str)  # tfds data dir; None: ~/.cache/hydra_jax/tensorflow_datasets
  c.data.train_split = "train[:800]"  # VTAB-1k: 800 train ...
  c.data.val_split = "train[54000:54200]"  # ... + 200 validation, carved at 90% of train
  c.data.test_split = "test"
  c.data.label_key = "label"  # the tfds feature holding the class
  c.data.vtab_task = placeholder(str)  # a data.VTAB1K task: its label function and class count
  c.data.num_classes = 10
  c.data.val_limit = placeholder(int)  # evaluate all 200 validation images
  c.data.test_limit = 2000  # first 2,000 of 10,000 test images (~1 min on 2 CPU cores); 0: all
  c.data.eval_batch_size = 200
  # augmentation of the training images inside the step (none in the VTAB-1k protocol)
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.flip = False  # mirror left-right with probability 1/2
  # a random resized crop covering this (min, max) share of the area, e.g. (0.08, 1.0) as
  # torchvision's RandomResizedCrop; None: no crop
  c.data.augment.crop_scale = placeholder(tuple)
  c.data.augment.crop_ratio = (3 / 4, 4 / 3)  # the crop's width / height range
  # mixup / CutMix of neighbouring examples: their Beta alpha (e.g. 0.8 / 1.0, as DeiT); 0: off
  c.data.augment.mixup = 0.0
  c.data.augment.cutmix = 0.0

  c.batch_size = 32  # global batch
  c.label_smoothing = 0.0  # the loss's targets: 1 - e on the class, e spread over all classes
  # accumulate each step's gradient over this many sequential parts of the batch: the same
  # update in about 1/M of the activations' memory (a resume may change it)
  c.microbatches = 1
  c.num_epochs = 6
  c.eval_every_epochs = 2  # validation accuracy and a checkpoint every this many epochs
  c.log_every = 5  # steps between metric lines
  c.checkpoint_every = 0  # extra checkpoints every N steps (0: only at evaluations)
  c.keep_checkpoints = 2  # the last N, plus the best by validation accuracy
  c.async_checkpoints = True
  c.progress = True  # tqdm progress bar
  c.export = True  # write merged params and adapters to workdir/export

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3  # peak learning rate (AdamW)
  c.optim.weight_decay = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.warmup_epochs = 1.0  # linear warm-up from warmup_init_lr, then cosine decay to min_lr
  c.optim.schedule = "cosine"  # or "timm_cosine": timm's epoch-stepped CosineLRScheduler
  c.optim.cosine_epochs = placeholder(int)  # timm_cosine: the cosine period (t_initial)
  c.optim.min_lr = 0.0
  c.optim.warmup_init_lr = 0.0
  c.optim.grad_clip = 0.0  # global-norm clipping (0: off)

  c.parallel = ml_collections.ConfigDict()
  c.parallel.mode = "jit"  # "jit" over a device mesh, or "pmap"
  c.parallel.num_devices = placeholder(int)  # devices in the data-parallel mesh (None: all)
  c.parallel.fsdp = False  # shard frozen weights over the mesh (large ViTs)
  c.parallel.fsdp_min_size = 2**16  # FSDP splits frozen leaves of at least this many elements
  c.parallel.distributed = ml_collections.ConfigDict()  # multi-host: jax.distributed.initialize
  c.parallel.distributed.coordinator = placeholder(str)  # "host:port", "auto" (TPU pods), None
  c.parallel.distributed.num_processes = placeholder(int)
  c.parallel.distributed.process_id = placeholder(int)
  return c


def get_testing_config() -> ml_collections.ConfigDict:
  """A tiny random ViT on a few Fashion-MNIST images: an end-to-end run in seconds."""
  c = get_config()
  c.model.checkpoint = placeholder(str)  # None ("random"): a random `variant`; or a path
  c.model.variant = "Ti/16"
  c.model.overrides = ml_collections.ConfigDict(
      dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4))
  c.model.image_size = 16
  c.model.pool = "tok"
  c.data.train_split = "train[:64]"
  c.data.val_split = "train[54000:54032]"
  c.data.test_limit = 64
  c.data.eval_batch_size = 32
  c.batch_size = 16
  c.num_epochs = 2
  c.eval_every_epochs = 1
  c.log_every = 2
  c.progress = False
  c.async_checkpoints = False
  return c
