"""Every image source behind one function, `load`, and one table of the kinds, `SOURCES`.

A spec (ddpm-train's --data, ddpm-evaluate's --real and --fake) names one of: the embedded tiles, an image folder,
a .npy file of uint8 images, or a .npz file of samples. Each kind's entry says how a spec is recognised, whether
ddpm-train takes it, whether its images keep their own size, which channel counts it can hold, and how it loads.
validation.validate asks `check_trainable`; evaluate.compare orders its two loads by `sets_size`. A new kind is
its loader's file and one entry here.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import numpy as np

from ddpm_jax.data.arrays import load_npy, load_npz
from ddpm_jax.data.embedded import EMBEDDED_NAME, embedded_dataset
from ddpm_jax.data.folder import common_size, load_image_folder


class Request(NamedTuple):
    """What `load` was asked for, as a kind's loader reads it."""

    image_size: int | None  # None: the kind's own (a file's, a folder's common size, the embedded tiles' 32 px)
    num: int | None  # embedded: how many tiles to make (None: 2048); the others: `load` keeps the first num
    embedded_seed: int
    float_range: str  # of float images in a .npz file
    strict: bool  # a folder: the first unreadable file is an error
    channels: int | None  # 1 or 3; None: the data's own


class Source(NamedTuple):
    """One kind of image source."""

    name: str
    description: str  # how messages name it
    recognises: Callable[[str], bool]  # whether a spec names a source of this kind; the first in SOURCES wins
    trains: bool  # ddpm-train's --data takes it
    # Its images keep the size they have (files are not resized, only checked against image_size): ddpm-evaluate
    # loads such a set first and sizes the other to it; otherwise the first in SOURCES' order sets the size.
    sets_size: bool
    channels: tuple[int, ...]  # the channel counts its images can have
    load: Callable[[str, Request], np.ndarray]  # uint8 (N, S, S, C); `load` then checks the size and channels


def _embedded(spec: str, r: Request) -> np.ndarray:
    return embedded_dataset(num_images=2048 if r.num is None else r.num,
                            image_size=32 if r.image_size is None else r.image_size, seed=r.embedded_seed)


def _folder(spec: str, r: Request) -> np.ndarray:
    return load_image_folder(spec, common_size(spec) if r.image_size is None else r.image_size,
                             channels=r.channels, strict=r.strict)


def _file(suffix: str) -> Callable[[str], bool]:
    return lambda spec: spec.endswith(suffix) and os.path.isfile(spec)


SOURCES = (
    Source("embedded", f"{EMBEDDED_NAME!r} (the built-in RGB tiles)", lambda spec: spec == EMBEDDED_NAME,
           trains=True, sets_size=False, channels=(3,), load=_embedded),
    Source("folder", "an image folder", os.path.isdir, trains=True, sets_size=False, channels=(1, 3), load=_folder),
    Source("npy", "a .npy file", _file(".npy"), trains=True, sets_size=True, channels=(1, 3),
           load=lambda spec, r: load_npy(spec)),
    Source("npz", "a .npz file", _file(".npz"), trains=False, sets_size=True, channels=(3,),
           load=lambda spec, r: load_npz(spec, r.float_range)),
)


def _either(descriptions: list[str]) -> str:
    """"a", "a or b", "a, b, or c"."""
    *first, last = descriptions
    return f"{', '.join(first)}{',' if len(first) > 1 else ''} or {last}" if first else last


def _recognised(spec: str) -> Source | None:
    return next((kind for kind in SOURCES if kind.recognises(spec)), None)


def source(spec: str) -> Source:
    """The kind of source `spec` names; a FileNotFoundError or ValueError says what is expected."""
    kind = _recognised(spec)
    if kind is None:
        expected = _either([k.description for k in SOURCES])
        if not os.path.exists(spec):
            raise FileNotFoundError(f"{spec}: no such file or folder; expected {expected}")
        raise ValueError(f"{spec}: expected {expected}")
    return kind


def check_trainable(spec: str, channels: int | None = None) -> Source:
    """The kind of ddpm-train's --data `spec`, checked before anything loads: one that trains, holding `channels`
    (None: the data's own); else a ValueError naming the flag."""
    kind = _recognised(spec)
    if kind is None or not kind.trains:
        raise ValueError(f"--data {spec}: expected {_either([k.description for k in SOURCES if k.trains])}")
    if channels is not None and channels not in kind.channels:
        raise ValueError(f"--channels {channels}: expected {' or '.join(map(str, kind.channels))} with "
                         f"{kind.description}")
    return kind


def load(spec: str, image_size: int | None, *, num: int | None = None, embedded_seed: int = 0,
         float_range: str = "0,1", strict: bool = False, channels: int | None = 3) -> np.ndarray:
    """The images `spec` names, as uint8 (N, S, S, C).

    spec: "embedded" (`embedded_dataset` with `embedded_seed`, `num` tiles, default 2048, of `image_size`, default
    32, px), an image folder (`load_image_folder` with `strict` and `channels`, resized to `image_size`; None: the
    size its images share, an error if they differ), a .npy file of uint8 (N, S, S, C) images (memory-mapped: a
    dataset larger than RAM), or a .npz file (the array under key "images", else the first array; converted by
    `images.to_uint8` with `float_range`; RGB). Files are not resized: their size must equal `image_size` when
    given. channels: 1 or 3, or None for the data's own (a folder: 1 when all its images are grayscale).
    num: keep at most the first `num` images (folders and files).
    """
    if num is not None and num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    kind = source(spec)
    images = kind.load(spec, Request(image_size, num, embedded_seed, float_range, strict, channels))
    if kind.sets_size and image_size is not None and images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"{spec}: images are {images.shape[1]}x{images.shape[2]} px, expected "
                         f"{image_size}x{image_size} (image_size); files are not resized")
    if channels is not None and images.shape[3] != channels:
        raise ValueError(f"{spec}: images have {images.shape[3]} channel(s), expected {channels}")
    return images[:num] if num is not None else images
