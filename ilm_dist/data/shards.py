"""Random access to packed WebDataset shards through their DALI index files.

The index (``wds2idx`` format) gives every component's byte offset and size, so one sample is a
``seek`` + ``read`` in its tar. That makes exact per-epoch permutations, equal steps per rank and
exact resume cheap, where a streaming reader would need shuffle buffers and skipping.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ilm_dist.data.manifest import Manifest, ManifestError, SplitInfo

REQUIRED_COMPONENTS = ("jpg", "lbl")


@dataclass(frozen=True)
class SampleRef:
    shard: int  # index into ShardReader.tars
    key: str
    components: dict[str, tuple[int, int]]  # extension -> (offset, size)


def parse_index(path: Path) -> list[SampleRef]:
    """Parse one ``wds2idx`` file (``v1.2 <count>`` then one line per sample)."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(
            f"{path}: cannot read as a DALI wds2idx index ({err.__class__.__name__})"
        ) from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != "v1.2" or not header[1].isdigit():
        raise ManifestError(f"{path}: not a DALI wds2idx v1.2 index (expected a first line 'v1.2 <count>')")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) % 4:
            raise ManifestError(f"{path}:{lineno}: expected groups of 'ext offset size name'")
        components, key = {}, None
        for ext, offset, size, name in zip(*[iter(fields)] * 4, strict=True):
            components[ext] = (int(offset), int(size))
            key = name.split("/")[-1].split(".", 1)[0]
        samples.append(SampleRef(-1, key or "", components))
    if len(samples) != int(header[1]):
        raise ManifestError(f"{path}: header says {header[1]} samples, found {len(samples)}")
    return samples


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
        offset, size = ref.components[ext]
        handle = self._files.get(ref.shard)
        if handle is None:
            handle = self._files[ref.shard] = open(self.tars[ref.shard], "rb")  # noqa: SIM115
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise ManifestError(f"{self.tars[ref.shard]}: sample {ref.key!r} .{ext} is truncated")
        return data

    def image(self, index: int) -> Image.Image:
        """The decoded image as RGB (grayscale X-rays are replicated to 3 channels for the ResNet stem)."""
        try:
            with Image.open(io.BytesIO(self.read(index, "jpg"))) as img:
                return img.convert("RGB")
        except OSError as err:
            ref = self.samples[index]
            raise ManifestError(
                f"{self.tars[ref.shard]}: sample {ref.key!r}: cannot decode JPEG ({err})"
            ) from None

    def label(self, index: int) -> np.ndarray:
        return np.frombuffer(self.read(index, "lbl"), dtype="<i4").astype(np.int64)

    def key(self, index: int) -> str:
        return self.samples[index].key
