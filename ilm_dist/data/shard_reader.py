"""Random access to packed WebDataset shards through their DALI index files.

The index (``wds2idx`` format) gives every component's byte offset and size, so one sample is a
``seek`` + ``read`` in its tar. That makes exact per-epoch permutations, equal steps per rank and
exact resume cheap, where a streaming reader would need shuffle buffers and skipping.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ilm_dist.data.manifest import Manifest, ManifestError, SplitInfo
from ilm_dist.data.shard_format import SampleRef, jpeg_size, label_vector, parse_index, read_component


class ShardReader:
    """Reads samples of one split by global index; safe to pickle into DataLoader workers."""

    def __init__(self, manifest: Manifest, split: str):
        info: SplitInfo = manifest.split(split)
        self.manifest = manifest
        self.tars = [shard.tar for shard in info.shards]
        self.samples: list[SampleRef] = []
        for shard_id, shard in enumerate(info.shards):
            refs = parse_index(shard.index)
            if len(refs) != shard.num_samples:
                raise ManifestError(
                    f"{shard.index}: {len(refs)} samples, manifest.json says {shard.num_samples}"
                )
            self.samples += [SampleRef(shard_id, r.key, r.components) for r in refs]
        self._files: dict[int, io.BufferedReader] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # open files stay in the process that opened them

    def read(self, index: int, ext: str) -> bytes:
        ref = self.samples[index]
        if ext not in ref.components:
            raise ManifestError(f"{self.tars[ref.shard]}: sample {ref.key!r} has no .{ext} component")
        handle = self._files.get(ref.shard)
        if handle is None:
            handle = self._files[ref.shard] = open(self.tars[ref.shard], "rb")  # noqa: SIM115
        data = read_component(handle, ref, ext)
        if len(data) != ref.components[ext][1]:
            raise ManifestError(f"{self.tars[ref.shard]}: sample {ref.key!r} .{ext} is truncated")
        return data

    def image(self, index: int) -> Image.Image:
        """The decoded image as RGB (grayscale X-rays are replicated to 3 channels for the ResNet stem)."""
        try:
            with Image.open(io.BytesIO(self.read(index, "jpg"))) as img:
                return img.convert("RGB")
        except (OSError, Image.DecompressionBombError) as err:
            ref = self.samples[index]
            raise ManifestError(
                f"{self.tars[ref.shard]}: sample {ref.key!r}: cannot decode JPEG ({err})"
            ) from None

    def pixels(self, index: int) -> torch.Tensor:
        """The decoded image as uint8 ``[H, W, 3]`` (gray replicated), by libjpeg-turbo: the pixels of
        :meth:`image` at a third of its cost. Its size is read from the header first, and an image above
        PIL's decompression-bomb limit is refused, as :meth:`image` refuses it."""
        data = self.read(index, "jpg")
        ref = self.samples[index]
        where = f"{self.tars[ref.shard]}: sample {ref.key!r}"
        size = jpeg_size(data)
        if size is None:
            raise ManifestError(f"{where}: cannot decode JPEG (no start-of-frame header)")
        if size[0] * size[1] > 2 * (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise ManifestError(f"{where}: {size[1]}x{size[0]} pixels, above the decompression-bomb limit")
        try:
            chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise ManifestError(f"{where}: cannot decode JPEG ({err})") from None
        return chw.permute(1, 2, 0)

    def label(self, index: int) -> np.ndarray:
        return label_vector(self.read(index, "lbl"))

    def key(self, index: int) -> str:
        return self.samples[index].key
