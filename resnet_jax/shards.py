"""Prepared datasets: the ArrayRecord shards `python -m resnet_jax.prepare` writes, and `prepared:DIR`,
which reads them back as a source like any other.

A folder holds `SPLIT-00000-of-0000N.array_record` shards and `prepared.json` (written last: its
presence means the folder is complete). Each record is one example: a little-endian int32 label, a
uint16 name length, the UTF-8 name of the original file or record (for messages), then the image's
JPEG bytes. Records are stored one per group and uncompressed, so every read is one seek.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from resnet_jax import augment, sources
from resnet_jax.augment import Example
from resnet_jax.sources import DatasetError

METADATA = "prepared.json"
STATE = ".prepare_state.json"  # finished shards of an unfinished run, for resuming
SPLITS = ("train", "eval")
WRITER_OPTIONS = "group_size:1,uncompressed"  # JPEG does not compress further; one record per seek
_HEADER = struct.Struct("<iH")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_record(label: int, name: str, image: bytes) -> bytes:
    encoded_name = name.encode("utf-8")[: 2**16 - 1]
    return _HEADER.pack(label, len(encoded_name)) + encoded_name + image


def decode_record(record: bytes) -> tuple[int, str, bytes]:
    label, name_length = _HEADER.unpack_from(record)
    start = _HEADER.size + name_length
    return label, record[_HEADER.size : start].decode("utf-8", "replace"), record[start:]


class PreparedSource:
    """One split's shards as a random-access source of lazily decoded JPEGs (like `FolderSource`)."""

    def __init__(self, paths: Sequence[str], mark_valid: bool):
        import grain

        self.paths, self.mark_valid = list(paths), mark_valid
        self.records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        label, name, image = decode_record(self.records[index])
        example = {"image": augment.EncodedImage(image, name), "label": np.int32(label)}
        return {**example, "valid": np.float32(1)} if self.mark_valid else example


def read_metadata(spec: str, path: str) -> dict[str, Any]:
    """The folder's prepared.json, or one line that says what the folder is instead."""
    if not os.path.isdir(path):
        raise DatasetError(f"dataset={spec!r}: {path} is not a directory")
    metadata_path = os.path.join(path, METADATA)
    if not os.path.exists(metadata_path):
        unfinished = os.path.exists(os.path.join(path, STATE))
        raise DatasetError(
            f"dataset={spec!r}: "
            + (
                f"{path} is an unfinished prepare run; run the same `python -m resnet_jax.prepare` "
                "command again to finish it"
                if unfinished
                else f"{path} has no {METADATA}; write one with `python -m resnet_jax.prepare "
                f"--data SPEC --out {path}`"
            )
        )
    with open(metadata_path) as f:
        return json.load(f)


def split_paths(path: str, metadata: dict[str, Any], split: str) -> list[str]:
    shards = metadata["splits"][split]["shards"]
    paths = [os.path.join(path, shard["file"]) for shard in shards]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DatasetError(
            f"{missing[0]} is missing ({len(missing)} of {len(paths)} {split} shards); "
            "run the prepare command again to rewrite them"
        )
    return paths


def original_eval(metadata: dict[str, Any]) -> Sequence[Example]:
    """The source's own eval split, full size, for a folder prepared with `--splits train`."""
    source = metadata["source"]
    options = ("data_dir", "train_split", "eval_split", "folder_eval_fraction")
    return sources.find(source["spec"], **{key: source[key] for key in options}).eval


def find_prepared(spec: str, path: str) -> sources.Found:
    """`prepared:DIR`: train (and eval, when it was prepared) from the shards, else eval from the source."""
    metadata = read_metadata(spec, path)
    train = PreparedSource(split_paths(path, metadata, "train"), mark_valid=False)
    if "eval" in metadata["splits"]:
        evaluation = PreparedSource(split_paths(path, metadata, "eval"), mark_valid=True)
    else:
        evaluation = original_eval(metadata)
    stats = metadata["stats"]
    return sources.Found(
        name=metadata["source"]["name"],
        train=train,
        eval=evaluation,
        class_names=tuple(metadata["class_names"]),
        channels=metadata["channels"],
        source_size=metadata["source_size"],
        stats=sources.known_stats(metadata["source"]["name"]) or (tuple(stats["mean"]), tuple(stats["std"])),
    )
