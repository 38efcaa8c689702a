"""Image sources and training batches: every image set a command names, behind one function, and a deterministic
batch stream.

  * `sources`: `load(spec, image_size, ...)`, the one loader of an image set, and `SOURCES`, the table of the kinds
    (the embedded tiles, an image folder, a .npy file, a .npz file): how each is recognised, whether it trains,
    whether it keeps its own size; `check_trainable` checks ddpm-train's --data before anything loads.
  * `embedded`: procedurally generated aerial forest tiles (`embedded_dataset`), so that training needs no download.
  * `folder`: every image under a folder, decoded once with the torchvision Resize + CenterCrop geometry, and cached
    (`cache`: the memory-mapped .npy and its record).
  * `arrays`: .npy files of uint8 images (memory-mapped) and .npz files of samples.
  * `batches`: the batch for a step as a pure function of (seed, step) (`get_batch`), and the device `Prefetcher`.
"""

from ddpm_jax.data.batches import Prefetcher, batch_indices, flip_mask, get_batch
from ddpm_jax.data.embedded import EMBEDDED_NAME, embedded_dataset
from ddpm_jax.data.cache import DIR_NAME as CACHE_DIR_NAME
from ddpm_jax.data.folder import IMAGE_EXTENSIONS, DataError, list_images, load_image_folder
from ddpm_jax.data.sources import SOURCES, Source, check_trainable, load, source

__all__ = [
    "CACHE_DIR_NAME",
    "EMBEDDED_NAME",
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "DataError",
    "Prefetcher",
    "Source",
    "batch_indices",
    "check_trainable",
    "embedded_dataset",
    "flip_mask",
    "get_batch",
    "list_images",
    "load",
    "load_image_folder",
    "source",
]
