"""Retrieval evaluation with the Flickr30k protocol, as a library (used by training) and a command.

    python evaluate.py --checkpoint runs/shapes/best --data-dir data/shapes --split test --json test.json

image -> text: a hit at K when ANY of the image's captions is among its K most similar captions.
text -> image: every caption ranks all images; a hit at K when its own image is among the top K.
Recall is in percent.
"""

import argparse
import sys
from pathlib import Path
from shlex import quote

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import load_model, locate, read_info, run_dir_of
from clip import clip_loss
from dataset import (RUN_SPLITS, CaptionData, EvalImages, Split, batch_loader, legacy_train_names, on_device,
                     read_json_file, text_batch, trained_images)
from images import Pixels
from utils import (autocast, checkpoint_data_dir, fast_cuda_kernels, inference_precision, path_arg, pick_device,
                   too_many_workers, trained_data_dir, write_json)

KS = (1, 5, 10)


@torch.no_grad()
def embed_images(model, split: Split, source, pixels: Pixels, device, dtype, batch_size: int,
                 num_workers: int = 0, progress: bool = False) -> torch.Tensor:
    """(n_images, D) float32 unit embeddings of a split's images, whole (no augmentation), on `device`."""
    batches = EvalImages(split, source, batch_size)
    loader = batch_loader(batches, range(len(batches)), num_workers, pin_memory=device.type == "cuda")
    out = []
    for batch in tqdm(on_device(loader, device), total=len(loader), desc="embedding images", unit="batch",
                      disable=not progress):
        with autocast(device, dtype):
            out.append(model.encode_image(pixels(batch["pixels"], batch["boxes"], device)).float())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, split: Split, pad_id: int, device, dtype, batch_size: int,
                progress: bool = False) -> torch.Tensor:
    """(n_captions, D) float32 unit embeddings of a split's tokenised captions, on `device`. The text tower skips
    the padding where it can (packing.py): the same embeddings, about twice as fast on a CPU."""
    out = []
    for lo in tqdm(range(0, len(split.captions), batch_size), desc="embedding captions", unit="batch",
                   disable=not progress):
        batch = text_batch(split, np.arange(lo, min(lo + batch_size, len(split.captions))), pad_id, pack_chunks=1)
        ids, mask, index = (batch[k].to(device) for k in ("input_ids", "attention_mask", "token_index"))
        with autocast(device, dtype):
            out.append(model.encode_text(ids, mask, index[0]).float())
    return torch.cat(out)


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                      ks=KS, chunk: int = 4096) -> dict:
    """Recall@K in both directions from embeddings; caption_image[c] is the index of caption c's image.

    Works in chunks of rows, so the full similarity matrix never has to fit in memory.
    """
    n_img, n_cap = len(image_emb), len(text_emb)
    caption_image = caption_image.to(image_emb.device)
    k = max(ks)
    i2t_first, t2i_first = [], []  # rank (0-based) of the first correct item within the top k, or k if none
    for lo in range(0, n_img, chunk):
        sim = image_emb[lo:lo + chunk] @ text_emb.T  # (chunk, n_cap)
        top = sim.topk(min(k, n_cap), dim=1).indices  # (chunk, k)
        hit = caption_image[top] == torch.arange(lo, lo + len(sim), device=sim.device)[:, None]
        i2t_first.append(torch.where(hit.any(1), hit.int().argmax(1), k))
    for lo in range(0, n_cap, chunk):
        sim = text_emb[lo:lo + chunk] @ image_emb.T  # (chunk, n_img)
        top = sim.topk(min(k, n_img), dim=1).indices  # (chunk, k)
        hit = top == caption_image[lo:lo + chunk, None]
        t2i_first.append(torch.where(hit.any(1), hit.int().argmax(1), k))
    i2t, t2i = torch.cat(i2t_first), torch.cat(t2i_first)
    metrics = {}
    for K in ks:
        metrics[f"i2t_R@{K}"] = (i2t < K).float().mean().item() * 100
        metrics[f"t2i_R@{K}"] = (t2i < K).float().mean().item() * 100
    metrics["mean_recall"] = float(np.mean([metrics[f"{d}_R@{K}"] for d in ("i2t", "t2i") for K in ks]))
    metrics["n_images"], metrics["n_captions"] = n_img, n_cap
    return metrics


@torch.no_grad()
def paired_loss(image_emb, text_emb, split: Split, logit_scale, batch_size: int) -> float:
    """The training loss on held-out pairs: for each caption slot j, images in order with their j-th caption, in
    batches of the training batch size, averaged over batches."""
    counts = np.diff(split.start)
    losses = []
    for j in range(int(counts.max())):
        images = np.flatnonzero(counts > j)
        captions = split.start[images] + j
        for lo in range(0, len(images), batch_size):
            i, c = images[lo:lo + batch_size], captions[lo:lo + batch_size]
            if len(i) > 1:
                losses.append(clip_loss(image_emb[i], text_emb[c], logit_scale))
    return torch.stack(losses).mean().item() if losses else float("nan")  # a one-image split has no negatives


def evaluate(model, split: Split, source, pixels: Pixels, pad_id: int, device, dtype, batch_size: int,
             loss_batch_size: int = 0, num_workers: int = 0, progress: bool = False) -> dict:
    """Recall@1/5/10 both ways (and, with loss_batch_size, the contrastive loss) of a model on a split."""
    was_training = model.training
    model.eval()
    image_emb = embed_images(model, split, source, pixels, device, dtype, batch_size, num_workers, progress)
    text_emb = embed_texts(model, split, pad_id, device, dtype, batch_size, progress)
    metrics = retrieval_metrics(image_emb, text_emb, torch.from_numpy(split.caption_image))
    if loss_batch_size:
        metrics["loss"] = paired_loss(image_emb, text_emb, split, model.scale().float(), loss_batch_size)
    model.train(was_training)
    return metrics


def seen_in_training(checkpoint, data: CaptionData, split: str) -> list[str] | None:
    """The images of a split that the checkpoint's run trained on, by its RUN/splits.json; for a run from before that
    file, by the default split of its time. None where neither can be known (a checkpoint kept outside its run).
    Not empty for val or test only if the data folder changed since training, or the default split did."""
    run = run_dir_of(checkpoint)
    if run is None:
        return None
    trained = trained_images(run / RUN_SPLITS)
    own_data = trained_data_dir(read_info(checkpoint)["config"]["data_dir"]).resolve() == data.data_dir.resolve()
    if trained is None and own_data and not (data.data_dir / "splits.json").exists():
        trained = legacy_train_names(list(data.captions))
    return None if trained is None else sorted(set(data.splits[split].images) & set(trained))


def warn_if_seen(checkpoint, data: CaptionData, split: str) -> int | None:
    """Say loudly when a split holds images the checkpoint trained on, and say when that cannot be known; returns how
    many (None: unknown)."""
    if split == "train":
        return None
    seen = seen_in_training(checkpoint, data, split)
    if seen is None:
        why = (f"it is kept outside its run (RUN/checkpoints/), so no RUN/{RUN_SPLITS} lies beside it; use it from "
               f"inside its run to check" if run_dir_of(checkpoint) is None else
               f"its run predates RUN/{RUN_SPLITS}, and the default split of its time does not apply to "
               f"{data.data_dir} (not its data folder, or one with its own splits.json)")
        print(f"note: whether checkpoint {checkpoint} trained on any of these {split} images cannot be checked: {why}",
              file=sys.stderr)
    if seen:
        record = run_dir_of(checkpoint) / RUN_SPLITS
        if not record.exists():
            fix = "its run predates RUN/splits.json and the default split has changed since: retrain to measure it"
        elif set(read_json_file(record, "")[split]) & set(trained_images(record)):
            fix = f"its data changed while it trained, so even its own {split} split holds them: retrain to measure it"
        else:
            fix = (f"`python download.py --prepare {quote(str(data.data_dir))} --split-file "
                   f"{quote(str(record))}` brings back its split")
        print(f"WARNING: {len(seen)} of the {len(data.splits[split])} {split} images (e.g. {seen[:3]}) were training "
              f"images of checkpoint {checkpoint}, so recall on them overstates the model; {fix}", file=sys.stderr)
    return None if seen is None else len(seen)


def format_table(metrics: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'':12}" + "".join(f"{f'R@{k}':>8}" for k in KS))
    for name, key in [("image->text", "i2t"), ("text->image", "t2i")]:
        lines.append(f"{name:12}" + "".join(f"{metrics[f'{key}_R@{k}']:8.1f}" for k in KS))
    lines.append(f"({metrics['n_images']} images, {metrics['n_captions']} captions; recall in %)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Image<->text retrieval recall of a checkpoint on a data split.",
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (RUN/best, RUN/last) or a run folder")
    p.add_argument("--data-dir", type=path_arg, help="data folder (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split to score")
    p.add_argument("--json", type=path_arg, help="also write the metrics to this JSON file")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU), or a device: cpu, cuda:1")
    p.add_argument("--batch-size", type=int, default=512, help="images or captions embedded at once")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes (0: in this one)")
    p.add_argument("--image-cache", default="auto", choices=["auto", "on", "off"], help="decode each image once into "
                   "a uint8 memmap beside the data, as training does (auto: if the disk has room), or decode JPEGs")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        p.error(f"--batch-size must be at least 1 and --num-workers at least 0, got {args.batch_size} and "
                f"{args.num_workers}")
    if why := too_many_workers(args.num_workers):
        p.error(why)
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json} is a folder; name the file to write, e.g. {Path(args.json) / 'test.json'}")
    try:
        device = pick_device(args.device)
        fast_cuda_kernels(device)  # as in training, whose test_metrics.json this should reproduce
        checkpoint = locate(args.checkpoint)  # the folder used, as named: the title says which
        model, cfg, tokenizer = load_model(checkpoint, device)
        dtype = inference_precision(cfg.precision, device)
        data = CaptionData(args.data_dir or checkpoint_data_dir(cfg.data_dir))
        pixels = Pixels.for_encoder(model.image_encoder.data_config, cfg.image_size, cfg.channels_last)
        data.open_images(pixels.square, args.image_cache, args.num_workers)
        data.tokenize(tokenizer, cfg.max_length)
        seen = warn_if_seen(checkpoint, data, args.split)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    split = data.splits[args.split]
    metrics = evaluate(model, split, data.source, pixels, tokenizer.pad_token_id, device, dtype, args.batch_size,
                       num_workers=args.num_workers, progress=sys.stderr.isatty())
    metrics.update(split=args.split, checkpoint=str(checkpoint.resolve()), data_dir=str(data.data_dir))
    if seen is not None:
        metrics["seen_in_training"] = seen
    print(format_table(metrics, f"{args.split} split of {data.data_dir}, checkpoint {checkpoint}"))
    if args.json:
        try:
            write_json(args.json, metrics)
        except OSError as e:  # the table above still stands; only the file is missing
            p.error(f"--json {args.json}: could not write the metrics ({e})")
    return metrics


if __name__ == "__main__":
    main()
