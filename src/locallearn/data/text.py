"""Plain text as byte-level tokens, for language models (docs/data.md, "Text").

``data.name=text`` with ``data.root`` a ``.txt`` file or a folder of them (read in sorted order, joined by a blank
line): every byte is a token (vocabulary 256, no tokenizer to download or trust). The last ``data.test_fraction``
of the bytes is the test split, so no test text is seen in training. A sample is a window of ``data.seq_len + 1``
bytes: the first ``seq_len`` are the input, the last ``seq_len`` the targets (the next byte at every position).
Training windows start every ``seq_len`` bytes from an offset drawn per epoch (so every epoch sees other window
boundaries) in an order shuffled per epoch, both from (data seed, epoch) alone, so a resumed epoch replays its
batches; test windows are fixed. The whole corpus stays resident on the device (a few MB).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import DatasetSpec, find_root, register_dataset
from .idx import DataError
from .loader import Triple, batches_per_epoch, seeded_generator

VOCAB = 256
SEPARATOR = b"\n\n"


def read_text(root: Path) -> np.ndarray:
    """The bytes of ``root`` (a file, or every ``*.txt`` below a folder in sorted order), as uint8."""
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{root}: no .txt files in this folder; point data.root at a text file or a folder of them")
    else:
        raise DataError(f"{root}: no such file or folder; point data.root at a text file or a folder of .txt files")
    data = SEPARATOR.join(p.read_bytes() for p in files)
    return np.frombuffer(data, dtype=np.uint8)


class TextLoader:
    """Windows of a resident byte tensor as ``(input (B, T) int64, target (B, T) int64, None)`` (module doc)."""

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        device: str | torch.device = "cpu",
        limit: int | None = None,
    ) -> None:
        self.device, self.seq_len, self.train, self.seed = torch.device(device), seq_len, train, seed
        self.tokens = tokens.to(self.device, torch.int64)
        self.windows = (len(tokens) - 1) // seq_len - (1 if train else 0)  # (one spare window for the offset)
        if limit:
            self.windows = min(self.windows, limit)
        if self.windows < 1:
            raise DataError(f"{len(tokens)} bytes make no window of data.seq_len={seq_len}+1; use a shorter seq_len")
        self.batch_size = min(batch_size, self.windows)
        self.n = self.windows
        self.span = torch.arange(seq_len + 1, device=self.device)

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.train)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Triple]:
        """Epoch ``epoch`` from batch index ``start`` on."""
        if self.train:
            gen = seeded_generator(self.seed, epoch)
            offset = int(torch.randint(0, self.seq_len, (1,), generator=gen))
            order = torch.randperm(self.windows, generator=gen).to(self.device)
        else:
            offset, order = 0, torch.arange(self.windows, device=self.device)
        for i in range(start, len(self)):
            starts = offset + order[i * self.batch_size : (i + 1) * self.batch_size] * self.seq_len
            window = self.tokens[starts[:, None] + self.span]
            yield window[:, :-1], window[:, 1:], None

    def __iter__(self) -> Iterator[Triple]:
        return self.batches(0)


def text_loaders(spec: DatasetSpec, data: Any, device: torch.device, seed: int, channels_last: bool) -> tuple:
    """(train, test, spec) loaders of ``data.root`` (module doc); the limits count windows."""
    tokens = torch.from_numpy(read_text(find_root(spec, data.root)).copy())
    cut = int(len(tokens) * (1 - data.test_fraction))
    train = TextLoader(
        tokens[:cut], data.seq_len, data.batch_size, train=True, seed=seed, device=device, limit=data.limit_train
    )
    test = TextLoader(
        tokens[cut:], data.seq_len, data.eval_batch_size, train=False, device=device, limit=data.limit_test
    )
    return train, test, spec


def _streamed(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    raise DataError(f"{root}: text is cut into windows by its loader (data.seq_len), not read as images")


register_dataset(
    DatasetSpec(
        name="text",
        num_classes=VOCAB,  # the vocabulary: one token per byte
        channels=1,
        size=0,
        mean=(0.0,),
        std=(1.0,),
        pad=0,
        pad_mode="zero",
        flip=False,
        default_roots=(),
        read=_streamed,
        hint="point data.root at a .txt file or a folder of .txt files",
        task="language_model",
        loaders=text_loaders,
    )
)
