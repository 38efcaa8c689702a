"""Training images: image folders, the embedded synthetic dataset, and a deterministic batch stream.

  * `embedded`: procedurally generated aerial forest tiles (`embedded_dataset`), so that training needs no download.
  * `folder`: every image under a folder, decoded once with the torchvision Resize + CenterCrop geometry, and cached
    (`cache`: the memory-mapped .npy and its record).
  * `batches`: the batch for a step as a pure function of (seed, step) (`get_batch`), and the device `Prefetcher`.
"""

from ddpm_jax.data.batches import Prefetcher, batch_indices, flip_mask, get_batch
from ddpm_jax.data.embedded import EMBEDDED_NAME, embedded_dataset
from ddpm_jax.data.cache import DIR_NAME as CACHE_DIR_NAME
from ddpm_jax.data.folder import IMAGE_EXTENSIONS, DataError, list_images, load_image_folder

__all__ = [
    "CACHE_DIR_NAME",
    "EMBEDDED_NAME",
    "IMAGE_EXTENSIONS",
    "DataError",
    "Prefetcher",
    "batch_indices",
    "embedded_dataset",
    "flip_mask",
    "get_batch",
    "list_images",
    "load_image_folder",
]
