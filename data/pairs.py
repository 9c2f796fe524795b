"""Image preference pairs, from source to batch: loading the rows (hub datasets, parquet/arrow folders, WebDataset
shards), filtering them (ties, label values, --max_train_samples), decoding and augmenting each pair, the labels and
per-pair weights, the samplers and streams that order them, and the collate that tokenizes the captions.

The video pairs are in data/video.py, the cached latents in data/latent_cache.py."""

from __future__ import annotations

import collections
import itertools
import logging
import math
import random
import re

import torch

from data.rows import UnusableCaption, bad_row, decode_image, valid_caption  # noqa: F401 - decode_image: re-exported
from families import FAMILIES

logger = logging.getLogger("train")


class PairDataset(torch.utils.data.Dataset):
    """Winner-first (6, H, W) pixel pairs in [-1, 1] (SFT: the winner alone, (3, H, W)) and the (possibly dropped) caption.

    Keys come from `EpochSampler` as (seed, epoch, index); every random choice (crop, flips, caption dropout) is drawn
    from a generator seeded by that key, so a batch is the same whichever worker decodes it and after a resume.
    An undecodable image skips its row: the next decodable row takes its place and the skip is counted.
    With --choice_model the pair keeps the dataset order (jpg_0, jpg_1) and the example also carries the two decoded
    images, the full caption and the human label, for the scorer that picks the winner in the training step.
    """

    def __init__(self, rows, args):
        self.rows, self.resolution = rows, args.resolution
        self.random_crop, self.hflip = args.random_crop, not args.no_hflip
        self.proportion_empty_prompts, self.caption_column = args.proportion_empty_prompts, args.caption_column
        self.for_scorer = bool(args.choice_model)
        self.winner_only = args.train_method == "sft" and not self.for_scorer  # SFT + scorer: the step picks the winner
        self.pair_weight_column = getattr(args, "pair_weight_column", None)

    def __len__(self):
        return len(self.rows)

    def transform(self, image, rng: random.Random) -> torch.Tensor:
        """Resize the shorter side (bilinear), crop, maybe flip, scale to [-1, 1]: the official transform."""
        import torchvision.transforms.functional as TF

        size = self.resolution
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR)
        if self.random_crop:
            top, left = rng.randint(0, image.height - size), rng.randint(0, image.width - size)
            image = TF.crop(image, top, left, size, size)
        else:
            image = TF.center_crop(image, [size, size])
        if self.hflip and rng.random() < 0.5:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), [0.5], [0.5])

    def __getitem__(self, key):
        index, n = key[2], len(self.rows)
        return self.example(key, (self.rows[(index + offset) % n] for offset in range(n)))

    def example(self, key, candidates) -> dict:
        """The example for `key` = (seed, epoch, position) from the first row of `candidates` (the keyed row, then the
        rows standing in for it) whose two images decode."""
        seed, epoch, index = key
        rng = random.Random(f"{seed}-{epoch}-{index}")
        bad_rows = []
        for attempt, row in enumerate(candidates):
            try:
                if not valid_caption(row[self.caption_column]):
                    raise UnusableCaption(f"unusable caption {row[self.caption_column]!r}")
                images = [decode_image(row["jpg_0"]), decode_image(row["jpg_1"])]
                break
            except Exception as error:  # noqa: BLE001 - an undecodable image or a bad caption skips the row, the run goes on
                bad_rows.append(bad_row(self.rows, epoch, index + attempt, "undecodable image", error))
                logger.debug(f"{key}: row skipped ({error})")
        else:
            raise RuntimeError(f"no row from row {index} on has two decodable images and a caption; check the "
                               f"jpg_0/jpg_1 and {self.caption_column} columns")
        skipped = int(attempt > 0)  # the keyed row itself was bad: counted once, by its own key, not by stand-ins
        if row["label_0"] == 0 and not self.for_scorer:
            images.reverse()  # winner first
        caption = full_caption = row[self.caption_column]
        if not isinstance(caption, str):  # a list of captions: pick one
            caption = full_caption = rng.choice(list(caption))
        if rng.random() < self.proportion_empty_prompts:
            caption = ""
        if self.winner_only:
            pixels = self.transform(images[0], rng)
        else:
            pixels = torch.cat([self.transform(image, rng) for image in images])
        example = {"pixel_values": pixels, "caption": caption, "skipped": skipped, "bad_rows": bad_rows}
        if self.pair_weight_column:
            example["pair_weight"] = pair_weight_of(row, self.pair_weight_column)
        if self.for_scorer:
            example.update(images=images, prompt=full_caption, label_0=float(row["label_0"]))
        return example


def pair_weight_of(row, column: str) -> float:
    """--pair_weight_column: the row's loss weight, a finite number >= 0 (a WebDataset field holds it as text)."""
    if column not in row:
        raise ValueError(f"--pair_weight_column {column}: the dataset has no such column (it has {', '.join(row)}); "
                         f"eval.make_pairs writes pair_weight")
    try:
        weight = float(row[column])
    except (TypeError, ValueError):
        weight = float("nan")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"--pair_weight_column {column}: {row[column]!r} is not a finite weight >= 0")
    return weight


def pair_dataset(rows, args):
    """PairDataset, or for a video family video_data.VideoPairDataset (the same keys, skips and random streams)."""
    if FAMILIES[args.model_family].video:
        from data.video import VideoPairDataset

        return VideoPairDataset(rows, args)
    return PairDataset(rows, args)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (seed, epoch, index) keys: a permutation seeded by (seed, epoch) when shuffling, else dataset order.

    Its state is the seed (saved in checkpoints), so a resumed run sees exactly the same batches, and where the run
    is: `used`, the pairs of this epoch that all processes together have trained on, set by the training loop. That
    position is global (accelerate deals batch g of the permutation to process g % W), so a run resumed on another
    number of processes goes on at the same pair.
    """

    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle, self.epoch, self.used = size, seed, shuffle, 0, 0

    def __len__(self):
        return self.size

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        return iter([(self.seed, self.epoch, i) for i in order.tolist()])

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "used": self.used}

    def load_state_dict(self, state):
        self.seed = state["seed"]
        self.epoch, self.used = state.get("epoch", 0), state.get("used", 0)  # absent in older checkpoints


class PairStream(torch.utils.data.IterableDataset):
    """PairDataset's examples from a stream (--streaming, WebDataset shards), with exact resume and no random access.

    Per epoch the filtered rows form one sequence (shuffled by a buffer seeded with (seed, epoch) when `shuffle`).
    From `start` on, row p belongs to batch g = (p - start) // B, and batch g to process g % W, as accelerate deals
    out map-style batches; a round of W batches is used only when it is complete, so every process gets the same
    number of batches. Each process and each of its DataLoader workers reads the whole sequence but decodes only its
    own batches (worker w of n takes every n-th). Examples are keyed (seed, epoch, p), so without shuffling a stream
    gives exactly PairDataset's pairs, and an undecodable row is replaced by the next one, as there.

    The state saved in checkpoints is (seed, epoch, position): `position` is where the next round starts, set by the
    training loop from the batches it has used; a resumed epoch starts there, skipping the used rows undecoded.
    """

    def __init__(self, rows, args, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.rows, self.pairs = rows, pair_dataset(None, args)
        self.seed, self.shuffle, self.buffer_size = seed, shuffle, args.shuffle_buffer_size
        self.batch_size, self.rank, self.world_size = args.train_batch_size, rank, world_size
        self.epoch, self.start, self.position = 0, 0, 0

    def ordered_rows(self):
        """This epoch's rows, undecoded. `.iter` rather than `iter()`: datasets would split the shards among the
        DataLoader workers, and here every worker needs the whole sequence."""
        rows = self.rows
        if self.shuffle:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.buffer_size)
            rows.set_epoch(self.epoch)
        for block in rows.iter(batch_size=64):
            yield from (dict(zip(block, values)) for values in zip(*block.values()))

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        rows = RowWindow(self.ordered_rows())
        per_round = self.batch_size * self.world_size
        for round_index in itertools.count():
            round_start = self.start + round_index * per_round
            rows.drop_before(round_start)
            if rows.get(round_start + per_round - 1) is None:
                return  # an incomplete last round is left out, on every process alike
            if round_index % workers != worker_id:
                continue
            first = round_start + self.rank * self.batch_size
            for position in range(first, first + self.batch_size):
                # Stand-ins for an undecodable row: the rows after it, or at the very end of the stream the round's first rows.
                later = itertools.takewhile(lambda row: row is not None, map(rows.get, itertools.count(position)))
                earlier = map(rows.get, range(round_start, position))
                example = self.pairs.example((self.seed, self.epoch, position), itertools.chain(later, earlier))
                yield dict(example, stream_position=round_start + per_round)

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        if "position" not in state:
            raise ValueError("the checkpoint comes from a run over a map-style (downloaded) dataset: resume it with the "
                             "same data source, without --streaming")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self.start = self.position


class RowWindow:
    """Random access to a window of a row iterator: rows are read as `get` asks for them and kept until dropped."""

    def __init__(self, rows):
        self.rows, self.kept, self.first = iter(rows), collections.deque(), 0

    def get(self, position: int):
        """The row at `position` (not yet dropped), or None past the end."""
        while self.first + len(self.kept) <= position:
            row = next(self.rows, None)
            if row is None:
                return None
            self.kept.append(row)
        return self.kept[position - self.first]

    def drop_before(self, position: int):
        """Forget the rows before `position`, reading past (not decoding) any not read yet."""
        while self.first < position:
            if self.kept:
                self.kept.popleft()
            elif next(self.rows, None) is None:
                return
            self.first += 1


class Collate:
    """Stacks pixels and tokenises captions with each tokenizer of the family (padded to `max_lengths`, by default each
    tokenizer's model_max_length); passes on the scorer's inputs (images, prompt, label_0) and a stream's position
    when the examples carry them."""

    def __init__(self, tokenizers, max_lengths=None):
        self.tokenizers = tokenizers
        self.max_lengths = max_lengths or [tokenizer.model_max_length for tokenizer in tokenizers]

    def __call__(self, examples):
        captions = [e["caption"] for e in examples]
        batch = {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
            "captions": captions,
            "skipped": torch.tensor(sum(e["skipped"] for e in examples)),
            "bad_rows": [bad for e in examples for bad in e.get("bad_rows", ())],  # (row id, reason, message)
        }
        for i, (tokenizer, length) in enumerate(zip(self.tokenizers, self.max_lengths)):
            ids = tokenizer(captions, max_length=length, padding="max_length", truncation=True, return_tensors="pt").input_ids
            batch["input_ids" if i == 0 else f"input_ids_{i + 1}"] = ids
        if "images" in examples[0]:
            batch.update(images=[e["images"] for e in examples], prompts=[e["prompt"] for e in examples],
                         label_0=torch.tensor([e["label_0"] for e in examples]))
        if "stream_position" in examples[0]:
            batch["stream_position"] = max(e["stream_position"] for e in examples)
        if "pair_weight" in examples[0]:
            batch["pair_weight"] = torch.tensor([e["pair_weight"] for e in examples], dtype=torch.float32)
        return batch


def worker_cause(message: str) -> str:
    """torch re-raises a DataLoader worker's exception as "Caught X in DataLoader worker process N.\nOriginal
    Traceback ...": the one line worth printing is the original exception's, at the end of that traceback."""
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    head = message.splitlines()[0]
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith(" ")]
    cause = re.sub(r"^[A-Za-z_][\w.]*: ", "", lines[-1])  # the exception type
    return f"{cause} ({head.removeprefix('Caught ').split(' in ', 1)[-1].rstrip('.')})"
