"""Convert Hugging Face BERT checkpoints (safetensors) into Flax params saved with orbax.

A converted folder holds:

    <out>/params        orbax checkpoint of the `BertClassifier` params tree
                        (`bert/...`, plus `classifier/...` when the source has a head)
    <out>/config.json   the Hugging Face config
    <out>/tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json
                        (whichever the source has)
    <out>/conversion.json   what was converted from where (written last: marks completion)

Only safetensors weights are read: pickled `pytorch_model.bin` files are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from tuning.models import bert as bert_lib

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
# Source tensors that are expected but not part of the encoder/classifier tree.
_IGNORED = (
    (re.compile(r"^embeddings\.position_ids$"), "position id buffer"),
    (re.compile(r"^cls\."), "pretraining head"),
)
_MARKER = "conversion.json"


class ConversionError(ValueError):
    """Raised when a checkpoint cannot be converted (message says why)."""


def _name_map(config: bert_lib.BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF tensor name (without `bert.` prefix) -> (Flax param path, transpose?)."""
    m: dict[str, tuple[tuple[str, ...], bool]] = {}

    def linear(hf: str, path: tuple[str, ...]):
        m[f"{hf}.weight"] = (path + ("kernel",), True)
        m[f"{hf}.bias"] = (path + ("bias",), False)

    def norm(hf: str, path: tuple[str, ...]):
        m[f"{hf}.weight"] = (path + ("scale",), False)
        m[f"{hf}.bias"] = (path + ("bias",), False)

    emb = ("bert", "embeddings")
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        m[f"embeddings.{name}.weight"] = (emb + (name, "embedding"), False)
    norm("embeddings.LayerNorm", emb + ("LayerNorm",))
    for i in range(config.num_hidden_layers):
        hf, fx = f"encoder.layer.{i}", ("bert", "encoder", f"layer_{i}")
        for qkv in ("query", "key", "value"):
            linear(f"{hf}.attention.self.{qkv}", fx + ("attention", qkv))
        linear(f"{hf}.attention.output.dense", fx + ("attention_output", "dense"))
        norm(f"{hf}.attention.output.LayerNorm", fx + ("attention_output", "LayerNorm"))
        linear(f"{hf}.intermediate.dense", fx + ("intermediate", "dense"))
        linear(f"{hf}.output.dense", fx + ("output", "dense"))
        norm(f"{hf}.output.LayerNorm", fx + ("output", "LayerNorm"))
    linear("pooler.dense", ("bert", "pooler", "dense"))
    return m


def _canonical_name(name: str) -> str:
    """Strips the `bert.` prefix and renames legacy LayerNorm gamma/beta."""
    if name.startswith("bert."):
        name = name[len("bert."):]
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _safetensors_files(folder: str) -> list[str]:
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    pickles = [f for f in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
               if os.path.isfile(os.path.join(folder, f))]
    if pickles:
        raise ConversionError(
            f"{folder} has {', '.join(pickles)} but no model.safetensors; we do not load pickled/"
            f"non-safetensors weights. Convert it first, e.g. in PyTorch: "
            f"AutoModel.from_pretrained(folder).save_pretrained(out, safe_serialization=True).")
    raise ConversionError(f"No model.safetensors found in {folder}.")


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a HF folder's safetensors file(s) as float32/int numpy arrays."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in _safetensors_files(folder):
        # The 'flax' framework reads bfloat16/float16 too; everything float becomes float32.
        try:
            with safe_open(file, framework="flax") as f:
                for key in f.keys():
                    arr = np.asarray(f.get_tensor(key))
                    if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
                        arr = arr.astype(np.float32)
                    tensors[key] = arr
        except Exception as e:  # pylint: disable=broad-except  # SafetensorError and friends
            raise ConversionError(
                f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); "
                "download it again") from None
    return tensors


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def convert_state_dict(tensors: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict[str, Any]]:
    """Maps HF tensors onto the `BertClassifier` params tree.

    Returns `(params, summary)`; summary has `converted` (count), `left_out`
    ({name: reason}) and `has_classifier`. Raises ConversionError listing any
    missing or unexpected tensors, or any shape mismatch.
    """
    config = bert_lib.bert_config_from_hf(hf_config)
    name_map = _name_map(config)
    head = {"classifier.weight": (("classifier", "kernel"), True),
            "classifier.bias": (("classifier", "bias"), False)}
    params: dict = {}
    used, left_out, unexpected, problems = set(), {}, [], []
    for raw_name, value in tensors.items():
        name = raw_name if raw_name in head else _canonical_name(raw_name)
        target = name_map.get(name) or head.get(name)
        if target is None:
            reason = next((r for pat, r in _IGNORED if pat.search(name)), None)
            if reason:
                left_out[raw_name] = reason
            else:
                unexpected.append(raw_name)
            continue
        path, transpose = target
        value = value.T if transpose else value
        used.add(name)
        _set(params, path, np.ascontiguousarray(value, dtype=np.float32))

    missing = [n for n in name_map if n not in used]
    # Checkpoints saved without a pooler (e.g. from BertForMaskedLM) are accepted: the
    # pooler then keeps its fresh initialisation in the model.
    pooler_missing = {"pooler.dense.weight", "pooler.dense.bias"} <= set(missing)
    if pooler_missing:
        missing = [n for n in missing if not n.startswith("pooler.")]
    has_head = {"classifier.weight", "classifier.bias"} & used
    if len(has_head) == 1:
        missing += sorted({"classifier.weight", "classifier.bias"} - used)
    if missing:
        prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
        named = [n if n.startswith("classifier.") else prefix + n for n in missing]
        problems.append(f"missing tensors: {', '.join(named)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if problems:
        raise ConversionError("Cannot convert checkpoint; " + "; ".join(problems))

    _check_shapes(params, config, hf_config)
    summary = {"converted": len(used), "left_out": left_out,
               "has_classifier": bool(has_head), "pooler_missing": pooler_missing}
    return params, summary


def _check_shapes(params: dict, config: bert_lib.BertConfig, hf_config: dict) -> None:
    """Compares converted shapes with those of a freshly built model."""
    import jax
    import jax.numpy as jnp

    num_classes = params["classifier"]["bias"].shape[0] if "classifier" in params else 2
    model = bert_lib.BertClassifier(config=config, num_classes=num_classes)
    ids = jnp.zeros((1, 4), jnp.int32)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]
    flat_expected = {"/".join(k.key for k in p): v.shape
                     for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    bad = []
    for p, v in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(k.key for k in p)
        if flat_expected.get(name) != v.shape:
            bad.append(f"{name}: checkpoint {v.shape} vs model {flat_expected.get(name)}")
    if bad:
        raise ConversionError("Shape mismatch between checkpoint and config: " + "; ".join(bad))


def resolve_source(source: str) -> str:
    """A local folder as is; otherwise a hub id fetched with `snapshot_download`."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise ConversionError(f"Source {source!r} is a file; give the model folder (config.json + model.safetensors).")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            source, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json",
                                    *TOKENIZER_FILES])
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ConversionError(
            f"{source!r} is not a local folder and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline? Pass a local "
            f"folder holding config.json and model.safetensors instead.") from e


def convert(source: str, out_dir: str, verbose: bool = True) -> dict[str, Any]:
    """Converts a HF folder or hub id into `out_dir` (must not exist yet). Returns the summary."""
    folder = resolve_source(source)
    hf_config = bert_lib.read_hf_config(folder)
    try:
        bert_lib.check_supported(hf_config)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    params, summary = convert_state_dict(read_safetensors(folder), hf_config)

    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "params")):
        raise ConversionError(f"{out_dir}/params already exists; choose a new --out folder.")
    os.makedirs(out_dir, exist_ok=True)
    ocp.PyTreeCheckpointer().save(os.path.join(out_dir, "params"), params)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copyfile(os.path.join(folder, name), os.path.join(out_dir, name))
            copied.append(name)
    summary = dict(summary, source=str(source), tokenizer_files=copied)
    with open(os.path.join(out_dir, _MARKER), "w") as f:
        json.dump(summary, f, indent=2)
    if verbose:
        print(format_summary(summary, out_dir))
    return summary


def format_summary(summary: dict[str, Any], out_dir: str) -> str:
    lines = [f"Converted {summary['converted']} tensors from {summary['source']} into {out_dir}"
             f" (classification head: {'yes' if summary['has_classifier'] else 'no'})."]
    if summary["left_out"]:
        lines.append(f"Left out {len(summary['left_out'])} tensors: " + ", ".join(
            f"{n} ({r})" for n, r in sorted(summary["left_out"].items())))
    if summary.get("pooler_missing"):
        lines.append("No pooler in the checkpoint: bert/pooler stays freshly initialised.")
    lines.append("Tokenizer files: " + (", ".join(summary["tokenizer_files"]) or "none"))
    return "\n".join(lines)


def load_converted_params(out_dir: str) -> dict:
    """The params tree (numpy arrays) saved by `convert` in `out_dir`."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(out_dir), "params")
    if not os.path.isdir(path):
        raise ValueError(f"No converted params at {path}; run `python -m tuning.convert` first.")
    return ocp.PyTreeCheckpointer().restore(path)


def ensure_converted(source: str, cache_dir: str, verbose: bool = True) -> str:
    """Returns a converted folder for `source`, converting into `cache_dir` only once.

    A source that already is a converted folder is returned as is. The cache key
    is the source's absolute path (or hub id); delete the cached folder after
    changing a source in place.
    """
    if os.path.isfile(os.path.join(source, _MARKER)):
        return source
    key = os.path.abspath(source) if os.path.isdir(source) else source
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key.strip("/"))[-60:]
    out_dir = os.path.join(os.path.abspath(cache_dir), f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    if os.path.isfile(os.path.join(out_dir, _MARKER)):
        if verbose:
            print(f"Using converted checkpoint {out_dir} for {source}.")
        return out_dir
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=cache_dir)
    try:
        convert(source, os.path.join(tmp, "out"), verbose=verbose)
        if os.path.exists(out_dir):  # an incomplete earlier attempt
            shutil.rmtree(out_dir)
        os.replace(os.path.join(tmp, "out"), out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
