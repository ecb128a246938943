"""Streaming tensor files: a safetensors writer that never holds more than one tensor, and a reader of
Hugging Face weight folders (safetensors, sharded or not; pickled ``.bin`` only with ``weights_only``).

The writer lays the file out from a plan (names, shapes, dtypes) before any data exists, then
writes each tensor at its offset as it arrives, in any order; tensors are stored sorted by name, so
the same tensors always give the same bytes. The header metadata is the only free-form part.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # Hugging Face's default max_shard_size ("5GB")


class WeightsError(ValueError):
    """A weights folder or file that cannot be read as asked (missing, malformed, unsafe)."""


Spec = Tuple[Tuple[int, ...], torch.dtype]


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor (see the module docstring).

    ``specs`` maps every name to (shape, dtype); :meth:`write` checks each tensor against it and
    :meth:`close` refuses a file with a tensor missing. The file appears under its name only when
    complete (written to ``.tmp`` then renamed).
    """

    def __init__(self, path: os.PathLike, specs: Dict[str, Spec], metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.specs = {name: (tuple(int(s) for s in shape), dtype) for name, (shape, dtype) in specs.items()}
        header: Dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.offsets: Dict[str, Tuple[int, int]] = {}
        position = 0
        for name in sorted(self.specs):
            shape, dtype = self.specs[name]
            if dtype not in SAFETENSORS_DTYPES:
                raise WeightsError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            size = tensor_bytes(shape, dtype)
            self.offsets[name] = (position, position + size)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [position, position + size]}
            position += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-(8 + len(encoded)) % 8)  # data starts 8-byte aligned
        self.data_start = 8 + len(encoded)
        self.total = position
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(encoded)))
        self.file.write(encoded)
        self.file.truncate(self.data_start + self.total)
        self.written: set = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.specs:
            raise WeightsError(f"{self.path.name}: tensor {name} is not in the planned layout")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise WeightsError(f"{self.path.name}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, the plan "
                               f"says {shape} {dtype}")
        start, end = self.offsets[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != end - start:
            raise WeightsError(f"{self.path.name}: tensor {name}: {data.nbytes} bytes, expected {end - start}")
        self.file.seek(self.data_start + start)
        self.file.write(memoryview(data))
        self.written.add(name)

    def close(self) -> None:
        missing = sorted(set(self.specs) - self.written)
        self.file.close()
        if missing:
            self.tmp.unlink(missing_ok=True)
            raise WeightsError(f"{self.path.name}: {len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class ShardedSafetensorsWriter:
    """HF's ``model.safetensors`` or, past ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors`` + index."""

    def __init__(self, folder: os.PathLike, specs: Dict[str, Spec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: Optional[Dict[str, str]] = None, stem: str = "model"):
        folder = Path(folder)
        groups: List[List[str]] = [[]]
        size = 0
        for name in sorted(specs):
            nbytes = tensor_bytes(*specs[name])
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        self.total_size = sum(tensor_bytes(*spec) for spec in specs.values())
        if len(groups) == 1:
            files = [f"{stem}.safetensors"]
        else:
            files = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        self.file_of = {name: files[i] for i, group in enumerate(groups) for name in group}
        self.writers = {file: SafetensorsWriter(folder / file, {n: specs[n] for n in group}, metadata)
                        for file, group in zip(files, groups)}
        self.index = folder / f"{stem}.safetensors.index.json" if len(groups) > 1 else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writers[self.file_of[name]].write(name, tensor)

    def close(self) -> List[str]:
        for writer in self.writers.values():
            writer.close()
        if self.index is not None:
            weight_map = dict(sorted(self.file_of.items()))
            self.index.write_text(json.dumps({"metadata": {"total_size": self.total_size}, "weight_map": weight_map},
                                             indent=2) + "\n")
        return list(self.writers)

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


# --------------------------------------------------------------------------- reading HF weight folders

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def _load_pickle(path: Path) -> Dict[str, torch.Tensor]:
    """A pickled state dict, unpickled only with ``weights_only=True`` (no code can run)."""
    import pickle

    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{path}: refused to unpickle (only plain tensors are read, with weights_only=True): "
                           f"{first}") from None
    except Exception as err:  # zipfile/EOF errors of a truncated or foreign file
        raise WeightsError(f"{path}: not a readable PyTorch weights file: {type(err).__name__}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: expected a flat state dict of tensors")
    return data


class HFWeights:
    """The tensors of an HF folder, read lazily one at a time, with their shapes and dtypes up front."""

    def __init__(self, folder: os.PathLike):
        self.folder = Path(folder)
        self._file_of: Dict[str, Path] = {}
        self._handles: Dict[Path, object] = {}
        self._pickles: Dict[Path, Dict[str, torch.Tensor]] = {}
        found = next((f for f in WEIGHT_FILES if (self.folder / f).is_file()), None)
        if found is None:
            present = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []
            raise WeightsError(f"{self.folder}: no weights found: expected one of {', '.join(WEIGHT_FILES)}; "
                               f"the folder holds {present or 'nothing'}")
        self.source = found
        if found.endswith(".index.json"):
            try:
                weight_map = json.loads((self.folder / found).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise WeightsError(f"{self.folder / found}: not a weight index ({err})") from None
            for name, file in weight_map.items():
                self._file_of[name] = self.folder / file
            for path in sorted(set(self._file_of.values())):
                if not path.is_file():
                    names = [n for n, p in self._file_of.items() if p == path]
                    raise WeightsError(f"{path}: listed in {found} (for {names[0]} and {len(names) - 1} more) but missing")
        else:
            self._file_of = {}
            path = self.folder / found
            for name in self._names_in(path):
                self._file_of[name] = path
        self._check_index_against_files()

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as err:
                raise WeightsError(f"{path}: not a readable safetensors file: {err}") from None
        return self._handles[path]

    def _names_in(self, path: Path) -> List[str]:
        if path.suffix == ".safetensors":
            return list(self._open(path).keys())
        if path not in self._pickles:
            self._pickles[path] = _load_pickle(path)
        return list(self._pickles[path])

    def _check_index_against_files(self) -> None:
        if not self.source.endswith(".index.json"):
            return
        for path in sorted(set(self._file_of.values())):
            present = set(self._names_in(path))
            for name, file in self._file_of.items():
                if file == path and name not in present:
                    raise WeightsError(f"{path}: tensor {name} is listed in {self.source} but not in the file")

    def names(self) -> List[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> Tuple[int, ...]:
        path = self._file_of[name]
        if path.suffix == ".safetensors":
            return tuple(self._open(path).get_slice(name).get_shape())
        return tuple(self._pickles[path][name].shape)

    def dtype(self, name: str) -> torch.dtype:
        path = self._file_of[name]
        if path.suffix == ".safetensors":
            code = self._open(path).get_slice(name).get_dtype()
            if code not in TORCH_DTYPES:
                raise WeightsError(f"{path}: tensor {name} has dtype {code}, which torch cannot hold")
            return TORCH_DTYPES[code]
        return self._pickles[path][name].dtype

    def get(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        if path.suffix == ".safetensors":
            return self._open(path).get_tensor(name)
        return self._pickles[path][name]

    def file_of(self, name: str) -> Path:
        return self._file_of[name]


def write_json(path: os.PathLike, data: dict) -> None:
    """JSON with sorted keys and a final newline (stable bytes for stable input)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def iter_progress(items: Iterable, total: int, desc: str, enabled: bool):
    """tqdm over ``items`` when ``enabled`` (on stderr), else the items themselves."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", dynamic_ncols=True)
