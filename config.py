"""Every setting of a run, in one typed dataclass; `--field-name value` flags are generated from its fields.

The defaults are the real Flickr30k recipe (pretrained ResNet-50 + DistilBERT, as in the popular CLIP tutorial).
`--preset shapes` swaps in small, randomly initialised encoders sized for the built-in data set on a laptop CPU.
"""

import argparse
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

from utils import too_many_workers, write_json

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Pooling = Literal["cls", "mean"]
CacheMode = Literal["auto", "on", "off"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass
class Config:
    # --- data ---
    data_dir: str = "data/flickr30k"  # Flickr30k layout, Flickr8k, or your own (README, "Data")
    run_dir: str = ""  # where config, metrics and checkpoints go; empty = runs/<date>-<time>
    image_cache: CacheMode = "auto"  # decode each image once into a uint8 memmap (fast); auto: if the disk has room
    num_workers: int = 4  # data-loading processes; the cached path needs few, JPEG decoding needs many

    # --- image tower ---
    image_model: str = "resnet50"  # any timm model name (ResNet, ViT, ...)
    image_pretrained: bool = True  # ImageNet weights from the Hugging Face Hub via timm
    image_trainable: bool = True  # False freezes the tower (only its projection head learns)
    image_freeze_bn_stats: bool = False  # keep a pretrained tower's batch-norm statistics (its scales still learn):
    #                                      steadier with small batches, lighter steps; open_clip's flag of that name
    image_size: int = 224  # training/eval resolution; 224 is what ImageNet-pretrained ResNets expect
    crop_scale_min: float = 0.9  # random-resized-crop keeps >= this share of the image; small, as captions name
    #                              positions and colours (so no flips or colour jitter either), as in open_clip

    # --- text tower ---
    text_model: str = "distilbert-base-uncased"  # Hub name or local folder; with --no-text-pretrained also a
    #                                               transformers model type such as "distilbert" (no download at all)
    text_pretrained: bool = True  # load the Hub weights; False builds the architecture with random weights
    text_trainable: bool = True  # False freezes the text tower (only its projection head learns)
    text_layers: int = 0  # >0 overrides the layer count when building from config (random init)
    text_width: int = 0  # >0 overrides the hidden size when building from config
    text_heads: int = 0  # >0 overrides the attention-head count when building from config
    text_pooling: Pooling = "cls"  # sentence vector: the [CLS] token (as the tutorial) or the mean over tokens
    tokenizer: str = ""  # "" = the text model's own; "local" = WordPiece trained on the captions (DATA/tokenizer)
    vocab_size: int = 8000  # upper bound on the vocabulary of a locally trained tokenizer
    max_length: int = 48  # tokens per caption; longer captions are cut (99% of Flickr30k captions fit in 40)
    pack_text: bool = True  # in training, DistilBERT/BERT skip the padding: their per-token layers run on the real
    #                         tokens only (packing.py); the same results with less work. Other models run padded;
    #                         evaluation and search always skip it where they can

    # --- heads and loss ---
    projection_dim: int = 256  # shared embedding size, as in the tutorial
    dropout: float = 0.1  # inside the projection heads
    init_temperature: float = 0.07  # logit scale starts at 1/0.07, as in the CLIP paper
    learn_temperature: bool = True  # False keeps the logit scale at its starting value

    # --- optimisation ---
    epochs: int = 10  # passes over the training images, each time with one of its captions
    batch_size: int = 256  # contrastive batch per process; the global batch is this x the number of processes
    accum_steps: int = 1  # >1: gradient caching in this many micro-batches (exact gradients but for batch norm)
    local_loss: bool = False  # under DDP each rank computes only its rows of the global logit matrix (less memory)
    lr_image: float = 1e-4  # pretrained encoders move slowly (these three rates are the tutorial's)...
    lr_text: float = 1e-5  # ...the text tower slowest...
    lr_head: float = 1e-3  # ...the freshly initialised heads and the temperature move fast
    weight_decay: float = 0.01  # AdamW default; never applied to norms, biases or the temperature
    warmup_frac: float = 0.05  # share of all steps warming the rate up linearly (the first step takes 1/warmup of it)
    min_lr_frac: float = 0.0  # cosine decays to this share of each group's learning rate
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0  # python, numpy and torch; each process adds its rank

    # --- machine ---
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu; or name one ("cuda:1")
    precision: Precision = "auto"  # auto: bf16 on CUDA where supported, fp16 otherwise, fp32 elsewhere
    compile: bool = False  # torch.compile the model (minutes to compile, then faster steps)
    compile_mode: CompileMode = "default"  # torch.compile's mode: reduce-overhead adds CUDA graphs (fewer launches);
    #                                         the max-autotune ones also search for faster kernels (longer compile)
    channels_last: bool = True  # faster convolutions on tensor cores
    eval_batch_size: int = 512  # images or captions embedded at once in evaluation

    # --- bookkeeping ---
    log_every: int = 20  # steps between reading the loss back from the device (each read syncs)
    save_every: int = 0  # >0: also write the `last` checkpoint every this many steps, not only every epoch
    resume: bool = False  # continue from RUN/last exactly where it stopped
    overwrite: bool = False  # allow starting over in a run directory that already holds a run

    def validate(self) -> None:
        """Reject settings that cannot work, naming the flag, before any work starts."""
        positive = ["epochs", "batch_size", "accum_steps", "image_size", "projection_dim", "max_length",
                    "eval_batch_size", "log_every", "vocab_size"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ["lr_image", "lr_text", "lr_head", "weight_decay", "grad_clip", "save_every",
                     "text_layers", "text_width", "text_heads", "num_workers"]:
            if not 0 <= getattr(self, name) < math.inf:  # also refuses nan, which every comparison fails
                raise ValueError(f"--{flag(name)} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**31:  # numpy's seeds stop at 2**32; each process adds its rank
            raise ValueError(f"--seed must be in [0, 2**31), got {self.seed}")
        sized = [f"--{flag(name)} {getattr(self, name)}" for name in ["text_layers", "text_width", "text_heads"]
                 if getattr(self, name)]
        if sized and self.text_pretrained:
            raise ValueError(f"{', '.join(sized)} only size a text tower built with random weights; --text-pretrained "
                             f"loads --text-model {self.text_model} at the size it was trained at: drop them, or add "
                             f"--no-text-pretrained")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"--batch-size {self.batch_size} must be divisible by --accum-steps {self.accum_steps}")
        if self.batch_size // self.accum_steps < 2:
            raise ValueError(f"--batch-size {self.batch_size} with --accum-steps {self.accum_steps} makes (micro-)"
                             f"batches of one pair, which has no negatives to contrast (and batch norm cannot "
                             f"normalise one image); use at least 2 pairs each")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"--crop-scale-min must be in (0, 1], got {self.crop_scale_min}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.01 <= self.init_temperature < math.inf:
            raise ValueError(f"--init-temperature must be at least 0.01 (a logit scale of at most 100, the CLIP "
                             f"paper's cap), got {self.init_temperature}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError("--warmup-frac must be in [0, 1) and --min-lr-frac in [0, 1]")
        if why := too_many_workers(self.num_workers):
            raise ValueError(why)
        if self.image_freeze_bn_stats and not self.image_pretrained:
            raise ValueError("--image-freeze-bn-stats keeps the batch-norm statistics of pretrained weights, and "
                             "--no-image-pretrained has none worth keeping; drop one of the two flags")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"--compile-mode {self.compile_mode} only applies with --compile; add --compile")
        for name in ["precision", "text_pooling", "image_cache", "compile_mode"]:
            choices = get_args(_field_types()[name])
            if getattr(self, name) not in choices:
                raise ValueError(f"--{flag(name)} must be one of {choices}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Overrides for the built-in data set: small towers, random init, small images, so the whole run fits in minutes
# on a 2-core CPU. Measured there: about 110-140 samples/s for this preset (see README).
PRESETS: dict[str, dict] = {
    "shapes": dict(
        data_dir="data/shapes",
        image_model="resnet18", image_pretrained=False, image_size=64,
        text_model="distilbert", text_pretrained=False, text_layers=2, text_width=128, text_heads=4,
        text_pooling="mean", tokenizer="local", max_length=32,
        projection_dim=128, dropout=0.0,
        epochs=8, batch_size=64, lr_image=1e-3, lr_text=1e-3, lr_head=1e-3, weight_decay=0.05,
        num_workers=0, eval_batch_size=256,
    ),
}


def flag(name: str) -> str:
    return name.replace("_", "-")


def _field_types() -> dict:
    return {f.name: f.type for f in dataclasses.fields(Config)}


def field_notes() -> dict[str, str]:
    """Each field's why-comment in Config's source (continuation lines included), so `--help` explains every flag."""
    notes, name = {}, None
    for line in inspect.getsource(Config).splitlines():
        field = re.match(r"    (\w+): [^#]*(?:#\s*(.*))?$", line)
        more = re.match(r"\s+#\s{2,}(\S.*)$", line)  # deeper-indented comment lines continue the one above
        if field:
            name = field.group(1) if field.group(2) else None
            if name:
                notes[name] = field.group(2)
        elif more and name:
            notes[name] += " " + more.group(1)
        elif not more:
            name = None
    return notes


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one `--field-name` per Config field (defaults suppressed, so we know what was set)."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --epoch is a typo to report, not --epochs
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named set of overrides")
    notes = field_notes()
    for f in dataclasses.fields(Config):
        kind = f.type
        note = notes.get(f.name, "").replace("%", "%%")  # argparse formats help strings with %
        help_text = f"{note} (default: {f.default!r})" if note else f"default: {f.default!r}"
        if kind is bool:
            parser.add_argument(f"--{flag(f.name)}", action=argparse.BooleanOptionalAction, help=help_text)
        elif get_origin(kind) is Literal:
            parser.add_argument(f"--{flag(f.name)}", choices=get_args(kind), help=help_text)
        else:
            parser.add_argument(f"--{flag(f.name)}", type=kind, help=help_text, metavar=kind.__name__.upper())
    return parser


def config_from_args(args: argparse.Namespace, validate: bool = True) -> Config:
    """Defaults, then the preset's overrides, then the flags given on the command line."""
    given = dict(vars(args))
    preset = given.pop("preset", None)
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {**PRESETS.get(preset, {}), **{k: v for k, v in given.items() if k in fields}}
    cfg = Config(**values)
    if validate:
        validate_with_preset(cfg, args)
    return cfg


def validate_with_preset(cfg: Config, args: argparse.Namespace) -> None:
    """cfg.validate(), whose messages also say which of the flags they name came from --preset, not from the
    command line (`--preset shapes --image-freeze-bn-stats` clashes with the preset's --no-image-pretrained)."""
    try:
        cfg.validate()
    except ValueError as e:
        preset = getattr(args, "preset", None)
        named = {m.replace("-", "_") for m in re.findall(r"--(?:no-)?([a-z][a-z0-9-]*)", str(e))}
        from_preset = [k for k in PRESETS.get(preset, {}) if k in named and k not in vars(args)]
        if not from_preset:
            raise
        shown = [f"--{'' if v else 'no-'}{flag(k)}" if isinstance(v, bool) else f"--{flag(k)} {v}"
                 for k, v in ((k, PRESETS[preset][k]) for k in from_preset)]
        raise ValueError(f"{e} (--preset {preset} set {', '.join(shown)}; a flag of your own overrides it)") from None


def parse_config(argv=None, description: str = "") -> Config:
    parser = build_parser(description)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as e:
        parser.error(str(e))


# fields of earlier versions that changed kernels, not results: a saved config that has one still loads
RETIRED = {"image_stem_channels"}  # zero channels padded onto the RGB stem; slower on an H100 at 4 and 8 (2026-11-27)


def config_from_dict(values: dict) -> Config:
    """Rebuild a saved config; fields added since it was saved take their defaults, retired ones are dropped,
    unknown ones are an error."""
    values = {k: v for k, v in values.items() if k not in RETIRED}
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"saved config has fields this version does not know: {unknown}")
    return Config(**values)


def save_config(cfg: Config, path) -> None:
    write_json(path, cfg.to_dict())  # atomic: --resume reads it back
