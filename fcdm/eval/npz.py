"""ADM-format .npz batches: uint8 NHWC images under `arr_0`, optional precomputed FID statistics; reading them, and
writing a large one in resumable shards.

The images are streamed from the zip member in batches because a 50k x 256x256 batch is ~10 GB; the statistics
(`mu`/`sigma` on pool_3 features, `mu_s`/`sigma_s` on spatial features) are small and loaded whole. NpzShards writes
such a batch one block of samples at a time (each block a file of its own, so an interrupted run redoes only the
missing ones) and streams the blocks, in sample order, into one .npz.
"""
from __future__ import annotations

import os
import zipfile
from typing import Iterator

import numpy as np

from fcdm.eval.metrics import FeatureStatistics
from fcdm.files import atomic_write, atomic_write_json, settings_differences

IMAGES_KEY = "arr_0"
POOL_STAT_KEYS = ("mu", "sigma")
SPATIAL_STAT_KEYS = ("mu_s", "sigma_s")


def _check_npz_path(path, name: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{name}: {path} is not an .npz (zip) archive")
    return path


def npz_keys(path, name: str = "path") -> list[str]:
    """Array names stored in an .npz, without loading any of them."""
    path = _check_npz_path(path, name)
    with zipfile.ZipFile(path) as archive:
        return [member[:-4] for member in archive.namelist() if member.endswith(".npy")]


class NpzImages:
    """The `arr_0` images of an ADM .npz: validated on open, then read in batches of (n, H, W, 3) uint8."""

    def __init__(self, path, name: str = "path", key: str = IMAGES_KEY):
        self.path = _check_npz_path(path, name)
        self.key = key
        self._name = name
        with zipfile.ZipFile(self.path) as archive:
            if f"{key}.npy" not in archive.namelist():
                found = ", ".join(npz_keys(self.path, name)) or "nothing"
                raise ValueError(f"{name}: {self.path} has no '{key}' array (it holds: {found}); ADM batches store "
                                 f"images as '{key}', shape (N, H, W, 3), dtype uint8")
            with archive.open(f"{key}.npy") as member:
                self.shape, self.fortran_order, self.dtype = _read_npy_header(member)
        self._validate()

    def _validate(self):
        where = f"{self._name}: '{self.key}' in {self.path}"
        if self.dtype != np.uint8:
            raise ValueError(f"{where} has dtype {self.dtype}; ADM batches store images as uint8 in [0, 255] "
                             f"(convert with np.clip(np.rint(x), 0, 255).astype(np.uint8))")
        if len(self.shape) != 4 or self.shape[3] != 3:
            hint = " (it looks NCHW: transpose to NHWC)" if len(self.shape) == 4 and self.shape[1] == 3 else ""
            raise ValueError(f"{where} has shape {self.shape}; expected (N, H, W, 3) NHWC RGB images{hint}")
        if self.shape[0] < 1 or self.shape[1] < 1 or self.shape[2] < 1:
            raise ValueError(f"{where} has shape {self.shape}: no images")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (n, H, W, 3) uint8 batches, n <= batch_size, covering every image once in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.fortran_order:
            # Column-major data cannot be sliced by rows from the byte stream; such files are rare and small.
            with np.load(self.path) as data:
                images = np.ascontiguousarray(data[self.key])
            for start in range(0, len(images), batch_size):
                yield images[start:start + batch_size]
            return
        image_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as member:
            _read_npy_header(member)
            for start in range(0, self.shape[0], batch_size):
                count = min(batch_size, self.shape[0] - start)
                data = _read_exactly(member, count * image_bytes, f"{self._name}: {self.path} '{self.key}'")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])

    def read_all(self) -> np.ndarray:
        return np.concatenate(list(self.batches(max(1, len(self)))), axis=0)


def _read_npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    # Version 3.0 exists only for structured dtypes with utf-8 field names, never for uint8 images.
    raise ValueError(f"unsupported .npy format version {version} (uint8 images are written as 1.0 or 2.0)")


def _read_exactly(stream, size: int, what: str) -> bytes:
    chunks, remaining = [], size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            raise ValueError(f"{what} is truncated: expected {size} more bytes, the file ended {remaining} short")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _statistics_pair(data, keys: tuple[str, str], where: str) -> FeatureStatistics | None:
    present = [key for key in keys if key in data.files]
    if not present:
        return None
    if len(present) != 2:
        missing = [key for key in keys if key not in present]
        raise ValueError(f"{where} has '{present[0]}' but not '{missing[0]}'; precomputed statistics come in pairs "
                         f"{keys}")
    mu, sigma = (np.asarray(data[key]) for key in keys)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: '{keys[0]}' must have shape (D,) and '{keys[1]}' shape (D, D), got {mu.shape} "
                         f"and {sigma.shape}")
    for key, value in zip(keys, (mu, sigma)):
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{where}: '{key}' has dtype {value.dtype}; expected floating point")
        if not np.isfinite(value).all():
            raise ValueError(f"{where}: '{key}' contains NaN or infinite values")
    return FeatureStatistics(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64))


def read_statistics(path, name: str = "path") -> dict[str, FeatureStatistics | None]:
    """Precomputed statistics {"pool": mu/sigma, "spatial": mu_s/sigma_s}; an entry is None when absent."""
    path = _check_npz_path(path, name)
    where = f"{name}: {path}"
    with np.load(path, allow_pickle=False) as data:
        return {"pool": _statistics_pair(data, POOL_STAT_KEYS, where),
                "spatial": _statistics_pair(data, SPATIAL_STAT_KEYS, where)}


def save_batch(path, images: np.ndarray, **extra) -> None:
    """Write an ADM-format batch: images under `arr_0` (validated uint8 NHWC), plus any extra arrays."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    np.savez(path, **{IMAGES_KEY: images}, **extra)


class NpzShards:
    """`count` samples written in blocks of `block_size` under <directory>/shards, then merged into one ADM .npz.

    Block k holds samples [k * block_size, (k + 1) * block_size), the last one fewer (`blocks[k]`, their indices).
    A block's shard holds its indices, labels and images, and is written atomically, so a shard that exists is
    complete; done(k) also checks that it holds block k's samples, so a torn or foreign file is simply redone."""

    def __init__(self, directory, count: int, block_size: int):
        if count < 1 or block_size < 1:
            raise ValueError(f"count and block_size must be >= 1, got {count} and {block_size}")
        self.directory = os.fspath(directory)
        self.blocks = [np.arange(start, min(start + block_size, count), dtype=np.int64)
                       for start in range(0, count, block_size)]
        self.settings_path = os.path.join(self.directory, "config.json")
        os.makedirs(os.path.join(self.directory, "shards"), exist_ok=True)

    def record_settings(self, settings: dict) -> None:
        """Write `settings` (what the samples depend on) beside the shards of a new run; on a rerun, ValueError naming
        every setting that differs, so that shards of two different runs are never merged."""
        differ = settings_differences(self.settings_path, settings)
        if differ:
            raise ValueError(f"{self.directory} holds a run with other settings ({', '.join(differ)} differ)")
        if not os.path.exists(self.settings_path):
            atomic_write_json(settings, self.settings_path)

    def todo(self, rank: int = 0, world_size: int = 1) -> tuple[list[int], list[int]]:
        """(the blocks of process `rank` of `world_size`: every world_size-th from `rank`, those not done yet)."""
        mine = list(range(rank, len(self.blocks), world_size))
        return mine, [k for k in mine if not self.done(k)]

    def path(self, k: int) -> str:
        return os.path.join(self.directory, "shards", f"batch_{k:06d}.npz")

    def done(self, k: int) -> bool:
        try:
            with np.load(self.path(k)) as shard:
                return np.array_equal(shard["indices"], self.blocks[k]) and len(shard["images"]) == len(self.blocks[k])
        except Exception:  # missing, torn or not ours: redo it
            return False

    def write(self, k: int, labels: np.ndarray, images: np.ndarray) -> None:
        """Block k's labels (n,) and uint8 images (n, H, W, 3)."""
        if len(images) != len(self.blocks[k]) or len(labels) != len(self.blocks[k]):
            raise ValueError(f"block {k} has {len(self.blocks[k])} samples, got {len(labels)} labels and "
                             f"{len(images)} images")
        atomic_write(self.path(k), lambda f: np.savez(f, indices=self.blocks[k], labels=labels, images=images))

    def merge(self, npz_path) -> tuple[int, ...]:
        """Stream every block's images, in sample order, into `npz_path` as arr_0 (N, H, W, 3) uint8, holding one
        block in memory at a time; written to a temporary and renamed, like the shards. -> arr_0's shape."""
        npz_path = os.fspath(npz_path)
        with np.load(self.path(0)) as first:
            image_shape = first["images"].shape[1:]
        total = sum(len(block) for block in self.blocks)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (total, *image_shape)}
        def write(file):
            with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                with archive.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(f, header)
                    for k in range(len(self.blocks)):
                        f.write(self._images_of_block(k, image_shape).tobytes())
        atomic_write(npz_path, write)
        return header["shape"]

    def _images_of_block(self, k: int, image_shape: tuple[int, ...]) -> np.ndarray:
        indices = self.blocks[k]
        with np.load(self.path(k)) as shard:
            if not np.array_equal(shard["indices"], indices) or shard["images"].shape[1:] != image_shape:
                raise ValueError(f"shard {self.path(k)} does not hold samples {indices[0]}..{indices[-1]} of shape "
                                 f"{image_shape}")
            return np.ascontiguousarray(shard["images"], dtype=np.uint8)
