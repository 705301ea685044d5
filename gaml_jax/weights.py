"""HF BERT checkpoints in, ``MultiExitBert`` params out, and back.

``load_pretrained`` takes any of:

* a HF folder: ``config.json`` with ``model_type: bert`` and ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``, or ``pytorch_model.bin``, which needs torch to unpickle);
* a hub id such as ``bert-base-uncased``, fetched with ``huggingface_hub.snapshot_download``;
* a folder written by ``python -m gaml_jax.convert`` (``save_converted``): orbax params, the whole
  ``ModelConfig`` and the tokenizer, marked by ``gaml_jax_config.json``. It needs neither torch
  nor the hub.

The mapping is mechanical: HF ``encoder.layer.3.attention.self.query.weight`` is our
``layer_3/attention/self/query/kernel`` transposed; LayerNorm ``weight``/``gamma`` is ``scale``,
``bias``/``beta`` is ``bias``; an Embedding's ``weight`` is ``embedding``. The heads follow HF's
rules for a new task head: ``pooler.dense`` starts the shared pooler or every per-exit pooler; a
``BertForSequenceClassification`` classifier whose shape fits starts the deepest exit; every
other exit classifier starts from N(0, initializer_range) with zero bias, seeded by ``seed``.
Pre-training heads (``cls.*``) and buffers (``embeddings.position_ids``) are dropped.

The exits' pooling (``ModelConfig.exit_pooling``) is the checkpoint's own where it says one
(``exit_pooling="auto"``, the default): a sentence-transformers folder whose ``modules.json``
names a Pooling module with ``pooling_mode_mean_tokens`` gets ``mean``; any other checkpoint
``cls``, the [CLS] state BERT's pooler reads. A converted folder keeps the value it was saved with.

Params are the ``params`` collection (``model.apply({"params": params}, ...)``): a plain nested
dict of float32 numpy arrays on the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from gaml_jax import names
from gaml_jax.config import ModelConfig
from gaml_jax.model import MultiExitBert

logger = logging.getLogger(__name__)

Params = dict[str, Any]

CONVERTED_MARKER = "gaml_jax_config.json"  # Marks a folder written by ``save_converted``.
_CONVERTED_FORMAT = 1
_PARAMS_DIR = "params"
_SAFETENSORS, _SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_TORCH_BIN, _TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# sentence-transformers describe their modules (the Pooling one among them) in these small files.
_ST_MODULES, _ST_POOLING = "modules.json", "sentence_transformers.models.Pooling"
_ST_FILES = (_ST_MODULES, "*Pooling/config.json")
_LOCAL_FOLDERS = (
    "a Hugging Face BERT folder (config.json with model_type 'bert', plus model.safetensors or "
    "pytorch_model.bin) or a folder written by `python -m gaml_jax.convert`"
)
_EXPECTED = f"{_LOCAL_FOLDERS}, or a hub id such as bert-base-uncased"
# Checkpoint tensors dropped by design: pre-training heads (MLM, NSP) and index buffers.
_HEAD_PREFIX = "cls."
_BUFFERS = frozenset({"embeddings.position_ids", "embeddings.token_type_ids"})
# Source keys name the exit layer a pooler or classifier belongs to (1-based). A HF pooler serves
# any layer and a HF classifier sits on the deepest exit: they carry this layer number instead.
_UNTIED = 0


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What loading a checkpoint did with its tensors and with the model's parameters."""

    source: str
    unused: tuple[str, ...]  # checkpoint tensors not loaded (unexpected, or a classifier that does not fit)
    ignored: tuple[str, ...]  # pre-training heads and buffers, dropped by design
    missing: tuple[str, ...]  # model parameters not in the checkpoint: they keep their seeded init
    notes: tuple[str, ...] = ()

    @property
    def new_parameters(self) -> tuple[str, ...]:
        """Missing parameters other than the exit classifiers, which are expected to start fresh."""
        return tuple(p for p in self.missing if not names.is_classifier(p))

    def log(self) -> None:
        fresh = sorted({p.split("/")[0] for p in self.missing if names.is_classifier(p)})
        logger.info(
            "Loaded %s. Exit classifiers starting from their init: %s. Dropped by design "
            "(pre-training heads, buffers): %d tensors.",
            self.source,
            ", ".join(fresh) or "none",
            len(self.ignored),
        )
        for note in self.notes:
            logger.warning("%s: %s", self.source, note)
        if self.unused:
            logger.warning(
                "%s: %d checkpoint tensors were not used: %s",
                self.source,
                len(self.unused),
                ", ".join(self.unused),
            )
        if self.new_parameters:
            logger.warning(
                "%s: %d model parameters are not in the checkpoint and keep their random init: %s",
                self.source,
                len(self.new_parameters),
                ", ".join(self.new_parameters),
            )


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str  # as the checkpoint names it, for reports and errors
    value: np.ndarray  # float32, in our layout (Dense kernels transposed)
    transposed: bool  # errors give shapes in the checkpoint's own layout


# ---------------------------------------------------------------------------------------------
# Loading.


def load_pretrained(
    name_or_path: str | os.PathLike,
    num_labels: int | None = None,
    *,
    seed: int = 0,
    exit_pooling: str = "auto",
    **config_overrides: Any,
) -> tuple[MultiExitBert, Params]:
    """Builds a ``MultiExitBert`` and its float32 params from a BERT checkpoint.

    Args:
      name_or_path: a HF BERT folder, a hub id, or a folder written by ``gaml_jax.convert``.
      num_labels: labels of every exit classifier (1 = regression). ``None``: the checkpoint's own
        (a converted folder's config, or the ``id2label`` of a ``BertForSequenceClassification``),
        else 2.
      seed: seeds the parameters the checkpoint does not hold (the exit classifiers).
      exit_pooling: ``cls``, ``mean``, or ``auto``: the checkpoint's own (``checkpoint_pooling``;
        a converted folder's saved value).
      **config_overrides: ``ModelConfig`` fields, e.g. ``exit_layers=(4, 8, 12)``,
        ``shared_pooler=False``, ``dtype="bfloat16"``.

    Returns:
      ``(model, params)``; apply with ``model.apply({"params": params}, input_ids, ...)``.

    Raises:
      FileNotFoundError: no such folder, or a folder without config.json or weights.
      ValueError: not a BERT checkpoint, a tensor whose shape does not fit the config, or a weights
        file that is damaged or incomplete (an interrupted download).
      OSError: a hub id that cannot be fetched (offline, or no such repository).
      ImportError: a ``pytorch_model.bin`` checkpoint and no torch.
    """
    folder = _resolve(name_or_path)
    if (folder / CONVERTED_MARKER).is_file():
        saved_config, saved_params = _read_converted(folder)
        if num_labels is not None:
            config_overrides["num_labels"] = num_labels
        if exit_pooling != "auto":
            config_overrides["exit_pooling"] = exit_pooling
        config = saved_config.replace(**config_overrides)
        source, ignored, unused = _converted_source(saved_config, saved_params), [], []
    else:
        hf_config = _read_hf_config(folder)
        if num_labels is None:
            num_labels = _hf_num_labels(hf_config)
        if exit_pooling == "auto":
            exit_pooling = checkpoint_pooling(folder)
        config = ModelConfig.from_hf(
            hf_config, num_labels=num_labels, exit_pooling=exit_pooling, **config_overrides
        )
        source, ignored, unused = _hf_source(_read_hf_weights(folder))
    params, report = _assemble(config, source, seed, str(name_or_path), ignored, unused)
    report.log()
    # On the device once: numpy leaves would be copied to it by every model.apply (33 ms against
    # 7.4 ms for a MiniLM forward at batch 1 on a CPU).
    return MultiExitBert(config), jax.device_put(params)


def convert_hf_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig, *, seed: int = 0, source: str = "state dict"
) -> tuple[Params, LoadReport]:
    """Maps a HF BERT state dict (numpy-convertible arrays) onto ``MultiExitBert(config)`` params.

    ``load_pretrained`` without the file reading; the report is returned rather than logged.
    """
    tensors, ignored, unused = _hf_source({name: np.asarray(array) for name, array in state_dict.items()})
    return _assemble(config, tensors, seed, source, ignored, unused)


def checkpoint_pooling(folder: str | os.PathLike) -> str:
    """The exit pooling a HF checkpoint folder was trained for: ``mean`` where its
    sentence-transformers files (``modules.json``, then the Pooling module's ``config.json``) say
    ``pooling_mode_mean_tokens``; ``cls`` otherwise (plain BERT, [CLS] pooling, or any pooling the
    exits do not offer, which is logged)."""
    folder = Path(folder)
    if not (folder / _ST_MODULES).is_file():
        return "cls"
    try:
        modules = json.loads((folder / _ST_MODULES).read_text())
        pooling = next((m for m in modules if m.get("type") == _ST_POOLING), None)
        if pooling is None:
            return "cls"
        modes = json.loads((folder / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, AttributeError, TypeError) as err:  # unreadable: BERT's own pooling
        logger.warning(
            "%s: cannot read its sentence-transformers pooling (%s); exits pool [CLS].", folder, err
        )
        return "cls"
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if not modes.get("pooling_mode_cls_token"):
        used = sorted(k for k, v in modes.items() if k.startswith("pooling_mode") and v)
        logger.warning("%s: pooling %s has no exit counterpart; exits pool [CLS].", folder, used)
    return "cls"


def load_tokenizer(name_or_path: str | os.PathLike):
    """The checkpoint's tokenizer (``AutoTokenizer``), with tokenizer.json's fixed padding and
    truncation turned off so that callers choose both per call.
    """
    folder = _resolve(name_or_path, weights=False)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)}."
        )
    import transformers

    if (folder / "tokenizer_config.json").is_file() or (folder / "config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    else:  # AutoTokenizer cannot tell the class from a lone vocab.txt.
        tokenizer = transformers.BertTokenizer.from_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    return tokenizer


def _resolve(name_or_path: str | os.PathLike, *, weights: bool = True) -> Path:
    """A local folder as is; anything else that does not look like a path is a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected {_EXPECTED}.")
    name = str(name_or_path)
    if _meant_as_folder(name):
        raise FileNotFoundError(f"No such folder: {os.path.abspath(path)}. Expected {_EXPECTED}.")
    return _download(name, weights)


def _meant_as_folder(name: str) -> bool:
    """Whether a name that is no folder here was meant as one rather than as a hub id (``name``
    or ``org/name``): it starts or ends like a path, has more parts than ``org/name``, or its
    ``org`` part is a folder here (``models/bert`` run from beside ``models/``)."""
    separators = tuple(s for s in ("/", os.sep, os.altsep) if s)
    parts = Path(name).parts
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.endswith(separators)
        or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )


def _download(repo_id: str, weights: bool) -> Path:
    from huggingface_hub import snapshot_download

    files = ["config.json", *_TOKENIZER_FILES, *_ST_FILES]
    safetensors_files = ["model*.safetensors", _SAFETENSORS_INDEX] if weights else []
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=files + safetensors_files))
        if weights and not any(
            folder.glob("model*.safetensors")
        ):  # Only then fetch the (larger, pickled) .bin.
            bin_files = ["pytorch_model*.bin", _TORCH_BIN_INDEX]
            folder = Path(snapshot_download(repo_id, allow_patterns=files + bin_files))
    except (OSError, ValueError) as err:  # The hub's offline, not-found and bad-id errors all are.
        raise OSError(
            f"Could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}), and "
            f"there is no folder {os.path.abspath(repo_id)}. Offline (HF_HUB_OFFLINE), no network, or no "
            f"such repository: pass a local folder instead, {_LOCAL_FOLDERS}."
        ) from err
    return folder


def _read_hf_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} holds no config.json, so it is not a BERT checkpoint; expected {_EXPECTED}."
        )
    hf_config = json.loads(config_file.read_text())
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type != "bert" and not (model_type is None and any(a.startswith("Bert") for a in architectures)):
        raise ValueError(
            f"{folder} is not a BERT checkpoint: its config.json has model_type {model_type!r} and gaml_jax "
            f"loads model_type 'bert' only; expected {_EXPECTED}."
        )
    position_embedding = hf_config.get("position_embedding_type", "absolute")
    if position_embedding != "absolute":
        raise ValueError(
            f"{folder} uses position_embedding_type {position_embedding!r}; "
            "MultiExitBert has absolute position embeddings only."
        )
    return hf_config


def _hf_num_labels(hf_config: Mapping[str, Any]) -> int:
    """A sequence classifier's own label count; 2 for any other checkpoint (as HF's default)."""
    if any(a.endswith("ForSequenceClassification") for a in hf_config.get("architectures") or []):
        if hf_config.get("num_labels"):
            return int(hf_config["num_labels"])
        if hf_config.get("id2label"):
            return len(hf_config["id2label"])
    return 2


def _read_hf_weights(folder: Path) -> dict[str, np.ndarray]:
    if (folder / _SAFETENSORS).is_file():
        return _read_safetensors(folder / _SAFETENSORS)
    if (folder / _SAFETENSORS_INDEX).is_file():
        return _read_shards(folder, _SAFETENSORS_INDEX, _read_safetensors)
    if (folder / _TORCH_BIN).is_file():
        return _read_torch_bin(folder / _TORCH_BIN)
    if (folder / _TORCH_BIN_INDEX).is_file():
        return _read_shards(folder, _TORCH_BIN_INDEX, _read_torch_bin)
    raise FileNotFoundError(
        f"{folder} holds no weights: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_TORCH_BIN} or "
        f"{_TORCH_BIN_INDEX} (it holds: {', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'})."
    )


def _read_shards(folder: Path, index_name: str, read) -> dict[str, np.ndarray]:
    weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read(folder / shard))
    return tensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        try:
            return safetensors.numpy.load_file(path)
        except TypeError:  # bfloat16, which numpy has no dtype for: read through JAX, on the host.
            from safetensors import flax as safetensors_flax

            with jax.default_device(jax.devices("cpu")[0]):
                tensors = safetensors_flax.load_file(path)
                return {k: np.asarray(v.astype(jnp.float32)) for k, v in tensors.items()}
    except safetensors.SafetensorError as err:
        raise ValueError(_damaged(path, err)) from err


def _damaged(path: Path, err: Exception) -> str:
    return (
        f"{path} is damaged or incomplete ({str(err).splitlines()[0]}); an interrupted download or copy "
        f"leaves such a file. Download or copy it again (for a hub id, delete it from the Hugging Face "
        f"cache, HF_HOME, and load again), or convert or export the checkpoint again."
    )


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{path} is a PyTorch pickle and reading it needs torch: `pip install torch` (the CPU build is "
            f"enough), or convert it once where torch is installed with `python -m gaml_jax.convert SRC DST` "
            f"and load DST."
        ) from err
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as err:  # torch's errors for a cut-short zip or pickle
        raise ValueError(_damaged(path, err)) from err
    return {
        name: (t.float() if t.is_floating_point() else t).numpy()
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor)
    }


def _hf_source(tensors: Mapping[str, np.ndarray]) -> tuple[dict[tuple, _Tensor], list[str], list[str]]:
    """HF tensors -> (source keyed like our params, names ignored by design, names not understood)."""
    source, ignored, unused = {}, [], []
    for name, array in tensors.items():
        short = name.removeprefix("bert.")
        if short.startswith(_HEAD_PREFIX) or short in _BUFFERS:
            ignored.append(name)
            continue
        mapped = _hf_key(short)
        if mapped is None:
            unused.append(name)
            continue
        key, transposed = mapped
        value = np.asarray(array, np.float32)
        source[key] = _Tensor(name, np.ascontiguousarray(value.T) if transposed else value, transposed)
    return source, ignored, unused


def _hf_key(name: str) -> tuple[tuple, bool] | None:
    """``encoder.layer.3.output.dense.weight`` -> ``(("layer_3", "output", "dense", "kernel"), True)``.

    The bool says whether the tensor is a Linear weight, stored transposed as our kernel. The HF
    pooler and classifier are keyed as untied (``("pooler", _UNTIED, ...)``): they fit any exit.
    """
    parsed = names.from_hf(name)
    if parsed is None:
        return None
    kind, index, inner, leaf, transposed = parsed
    if kind == "layer":
        head = (names.layer(index),)
    elif kind == "embeddings":
        head = (names.EMBEDDINGS,)
    else:
        head = (kind, _UNTIED)
    return (*head, *inner, leaf), transposed


def _converted_source(config: ModelConfig, params: Params) -> dict[tuple, _Tensor]:
    """Our own params -> source keys, poolers and classifiers keyed by the layer of their exit."""
    source = {}
    for path, value in traverse_util.flatten_dict(params).items():
        kind, index = names.parse(path[0])
        if names.is_exit_head(path[0]):
            key = (kind, _UNTIED if index is None else config.exits[index], *path[1:])
        else:
            key = path
        source[key] = _Tensor("/".join(path), np.asarray(value, np.float32), transposed=False)
    return source


def _candidates(config: ModelConfig, path: tuple, pooler_layers: list[int]) -> list[tuple]:
    """Source keys that may fill the parameter at ``path``, best first."""
    (kind, k), rest = names.parse(path[0]), path[1:]
    if kind == "pooler":
        keys = []
        if k is not None:  # Per-exit: its own layer's pooler first.
            keys.append(("pooler", config.exits[k], *rest))
        keys.append(("pooler", _UNTIED, *rest))
        if pooler_layers:  # From per-exit poolers: the deepest, which is the one BERT's own pooler was.
            keys.append(("pooler", pooler_layers[-1], *rest))
        return keys
    if kind == "classifier":
        keys = [("classifier", config.exits[k], *rest)]
        if k == config.num_exits - 1:
            keys.append(("classifier", _UNTIED, *rest))
        return keys
    return [path]


def _assemble(
    config: ModelConfig,
    source: dict[tuple, _Tensor],
    seed: int,
    name: str,
    ignored: Sequence[str] = (),
    unused: Sequence[str] = (),
) -> tuple[Params, LoadReport]:
    model = MultiExitBert(config)
    abstract = traverse_util.flatten_dict(_abstract_params(config))
    pooler_layers = sorted(key[1] for key in source if key[0] == "pooler" and key[1] != _UNTIED)
    params, used, missing, notes = {}, set(), [], []
    inits: dict[str, Params] = {}
    for path, leaf in abstract.items():
        found = None
        for key in _candidates(config, path, pooler_layers):
            tensor = source.get(key)
            if tensor is None:
                continue
            if tensor.value.shape != leaf.shape:
                if names.is_classifier(path[0]):  # Another task's head: start this one fresh.
                    notes.append(
                        f"{tensor.name} has shape {_shown(tensor.value.shape, tensor)} but num_labels="
                        f"{config.num_labels} needs {_shown(leaf.shape, tensor)}: "
                        f"{path[0]} starts from its init."
                    )
                    continue
                raise ValueError(
                    f"Checkpoint tensor {tensor.name!r} has shape {_shown(tensor.value.shape, tensor)}, "
                    f"but the model built from the config expects {_shown(leaf.shape, tensor)} "
                    f"for {'/'.join(path)}. "
                    f"Check the config overrides against the checkpoint."
                )
            found = tensor
            break
        if found is None:
            missing.append("/".join(path))
            params[path] = _initial_value(model, seed, path, inits)
        else:
            used.add(found.name)
            params[path] = found.value.copy()  # A shared source (the HF pooler) may fill several leaves.
    if any(names.parse(p.split("/")[0])[0] == "pooler" for p in missing):
        notes.append("the checkpoint has no pooler (pooler.dense): the exit poolers keep their random init.")
    unused = list(unused) + sorted({t.name for t in source.values()} - used)
    if not config.exit_pooler_dense:  # A model without poolers drops the checkpoint's by design.
        dropped = [n for n in unused if n.removeprefix("bert.").startswith("pooler")]
        ignored, unused = [*ignored, *dropped], [n for n in unused if n not in dropped]
    report = LoadReport(name, tuple(unused), tuple(ignored), tuple(missing), tuple(notes))
    return traverse_util.unflatten_dict(params), report


def _shown(shape: tuple[int, ...], tensor: _Tensor) -> tuple[int, ...]:
    """A shape in the checkpoint's layout (HF Linear weights are [out, in])."""
    return tuple(int(d) for d in (shape[::-1] if tensor.transposed else shape))


def _abstract_params(config: ModelConfig) -> Params:
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(MultiExitBert(config).init, jax.random.key(0), ids)["params"]


def _initial_value(model: MultiExitBert, seed: int, path: tuple, inits: dict[str, Params]) -> np.ndarray:
    """The model's own seeded init of one parameter.

    Only the exit heads (poolers, classifiers) are initialised in the common case: a full init
    of BERT-base takes seconds on a CPU, for tensors the checkpoint overwrites. Flax derives each
    parameter's key from its path, so both give the same values.
    """
    part = "heads" if names.is_exit_head(path[0]) else "all"
    if part not in inits:

        def init() -> Params:  # one compiled program, not dozens of eager operations (cold start)
            key = jax.random.key(seed)
            if part == "heads":
                hidden = jnp.zeros((1, 1, model.config.hidden_size), jnp.float32)
                mask = jnp.ones((1, 1), jnp.int32)
                heads = lambda m, h: [m.exit(k, h, mask) for k in range(m.config.num_exits)]
                return model.init(key, hidden, method=heads)["params"]
            return model.init(key, jnp.ones((1, 1), jnp.int32))["params"]

        inits[part] = jax.device_get(jax.jit(init)())
    return np.asarray(traverse_util.flatten_dict(inits[part])[path], np.float32)


# ---------------------------------------------------------------------------------------------
# Converted folders (``python -m gaml_jax.convert``).


def save_converted(
    path: str | os.PathLike,
    model_config: ModelConfig,
    params: Params,
    tokenizer=None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes params (orbax), the whole ``ModelConfig`` and the tokenizer to one folder, atomically.

    ``load_pretrained(path)`` reads it back bit for bit, without torch or the hub; it refuses
    to replace a non-empty folder unless ``overwrite``.
    """
    import orbax.checkpoint as ocp

    params = jax.tree.map(lambda x: np.asarray(x, np.float32), _checked(model_config, params))
    record = {"format": _CONVERTED_FORMAT, "model_config": dataclasses.asdict(model_config)}
    with _atomic_dir(path, overwrite) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:  # Leaving the block waits for the write.
            checkpointer.save(tmp / _PARAMS_DIR, params)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / CONVERTED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return Path(path)


def _read_converted(folder: Path) -> tuple[ModelConfig, Params]:
    import orbax.checkpoint as ocp

    record = json.loads((folder / CONVERTED_MARKER).read_text())
    if record.get("format") != _CONVERTED_FORMAT:
        raise ValueError(
            f"{folder / CONVERTED_MARKER} has format {record.get('format')!r}; this gaml_jax reads format "
            f"{_CONVERTED_FORMAT}. Convert the checkpoint again."
        )
    config = ModelConfig(**record["model_config"])
    target = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), _abstract_params(config))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore((folder / _PARAMS_DIR).absolute(), target)
    return config, params


# ---------------------------------------------------------------------------------------------
# Export to HF.


def save_hf(
    path: str | os.PathLike,
    model_config: ModelConfig,
    params: Params,
    tokenizer=None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes the deepest exit as a HF ``BertForSequenceClassification`` folder, atomically.

    The encoder up to the deepest exit's layer, that exit's pooler as ``bert.pooler`` and its
    classifier as ``classifier``; the other exits have no place in a single-exit HF model.
    ``transformers.BertForSequenceClassification.from_pretrained(path)`` then gives the deepest
    exit's logits.

    Raises:
      ValueError: the exits pool otherwise than HF's pooler (dense + tanh on [CLS]), which a
        ``BertForSequenceClassification`` cannot express.
    """
    if model_config.exit_pooling != "cls" or not model_config.exit_pooler_dense:
        how = (
            f"exit_pooling={model_config.exit_pooling!r}, exit_pooler_dense={model_config.exit_pooler_dense}"
        )
        raise ValueError(
            f"HF BertForSequenceClassification applies dense + tanh to the [CLS] state and cannot express "
            f"this model's exits ({how}): the export would compute something else. Keep the JAX model "
            f"(save_converted, python -m gaml_jax.convert), or train with model.exit_pooling=cls and "
            f"model.exit_pooler_dense=True to export to HF."
        )
    deepest = model_config.num_exits - 1
    depth = model_config.exits[-1]
    # What a single-exit HF model holds: the layers up to the deepest exit and that exit's head.
    exported = {
        names.EMBEDDINGS,
        *(names.layer(i) for i in range(depth)),
        names.pooler(deepest, model_config.shared_pooler),
        names.classifier(deepest),
    }
    tensors = {}
    for leaf_path, value in traverse_util.flatten_dict(_checked(model_config, params)).items():
        head, *modules, leaf = leaf_path
        if head not in exported:
            continue
        kind, index = names.parse(head)
        hf_name, transposed = names.to_hf(kind, index if kind == "layer" else None, tuple(modules), leaf)
        value = np.asarray(value, np.float32)
        prefix = "" if kind == "classifier" else "bert."
        tensors[prefix + hf_name] = np.ascontiguousarray(value.T if transposed else value)
    labels = range(model_config.num_labels)
    hf_config = {
        **model_config.to_hf(),
        "num_hidden_layers": depth,
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "position_embedding_type": "absolute",
        "id2label": {str(i): f"LABEL_{i}" for i in labels},
        "label2id": {f"LABEL_{i}": i for i in labels},
    }
    with _atomic_dir(path, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        safetensors.numpy.save_file(tensors, tmp / _SAFETENSORS, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)


def _checked(config: ModelConfig, params: Params) -> Params:
    """``params`` (or ``{"params": params}``), checked against the tree ``config`` builds."""
    if set(params) == {"params"}:
        params = params["params"]
    expected = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(_abstract_params(config)).items()}
    got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(params).items()}
    if got != expected:
        wrong = sorted("/".join(p) for p in set(got) | set(expected) if got.get(p) != expected.get(p))
        raise ValueError(f"params do not match the model config at: {', '.join(wrong[:10])}.")
    return params


@contextlib.contextmanager
def _atomic_dir(path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary folder beside ``path`` that becomes ``path`` only once fully written."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if path.exists():
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
