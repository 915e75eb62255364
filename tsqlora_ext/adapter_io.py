"""Adapter files: save / load a wrapped model's adapter, and export it as a standard PEFT LoRA adapter.

``save_adapter(model, dir)`` writes two files:
- ``adapter_model.safetensors``: per adapted layer only its ACTIVE components, compacted
  (``<layer>.lora_A`` [r, in], ``<layer>.lora_E`` [r], ``<layer>.lora_B`` [out, r]) and their ids in
  the r_max slots (``<layer>.active`` [r]); layers at rank 0 store nothing. The trainable head
  (``modules_to_save``) is stored in full under its parameter names.
- ``adapter_config.json``: the TsqLoRAConfig, per-layer ranks, the sha256 of the weights file, the
  head's class names (``config.id2label``; ``load_adapter`` puts them back), and a
  fingerprint of the base model (class name, adapted layer names and shapes, head parameter
  shapes) so that loading onto another architecture or size fails with a message naming the
  mismatch instead of a shape error deep inside torch.

``export_peft(model, dir)`` writes what ``peft.PeftModel.from_pretrained(base_model, dir)`` loads:
each layer's ΔW = s · B_act diag(E_act) A_act becomes PEFT's lora_B @ lora_A with E folded into
lora_B, the layer's rank in ``rank_pattern`` and an ``alpha_pattern`` entry chosen so that PEFT's
per-layer scaling lora_alpha / r equals our fixed s = lora_alpha / r_init; continuing training under
PEFT therefore sees the same gradient scale. Layers at rank 0 are left out of ``target_modules``. The
head goes in as PEFT's ``modules_to_save``, with every module tied to it (GPT-2's input embeddings
share lm_head's weight, which training here moves in both) and every head PEFT's task type adds on
load (classifier / score, qa_outputs), trained here or not.

Both writers build the whole new directory in a temporary sibling (``.<name>.tmp-*``), with the
existing directory's other entries hard-linked into it, and swap it in: the existing directory is
renamed aside (``.<name>.old``), the new one renamed into place, the old one deleted. A reader sees
the old version or the new one, never a mix: ``load_adapter`` reads both files through one handle
on the folder, and starts again when a save deletes the version it holds. A process killed in the middle leaves the old version
aside while the new one is not yet in place: ``load_adapter`` then reads it there, and the next
write to the directory puts it back (or, when the new one did get in place, deletes it) and removes
left-over temporaries. One writer per directory at a time. The new version keeps the old one's
mode, owner and group (as far as the process may set them); a folder that is read-only to the
writer, or is a mount point, cannot be replaced so and is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from . import _build_config
from .config import TsqLoRAConfig
from .wrap import _inside, _uncompiled, adapted_layers, is_wrapped, unwrap, wrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "tsqlora_ext-adapter"
FORMAT_VERSION = 1


# ---- helpers ------------------------------------------------------------------------------------
def _require_wrapped(model: nn.Module, fn: str) -> None:
    if not is_wrapped(model):
        raise ValueError(f"tsqlora_ext.{fn}: the model is not wrapped; call tsqlora_ext.wrap(model) first")


def _head_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained head's parameters by name; a weight tied across them (embed_tokens and
    lm_head both trained) once, under its first name, as named_parameters gives it."""
    out, seen = {}, set()
    for module_name in model.tsqlora_state.modules_to_save:
        for pname, p in model.get_submodule(module_name).named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{module_name}.{pname}"] = p
    return out


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture of a wrapped model as far as the adapter depends on it."""
    return {
        "class": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "layers": {n: [layer.out_features, layer.in_features] for n, layer in adapted_layers(model)},
        "modules_to_save": {n: list(p.shape) for n, p in _head_parameters(model).items()},
    }


def _head_labels(model: nn.Module) -> list[str] | None:
    """The class names of a trained head (``config.id2label``): saved beside it, so that the
    predictions of a model the adapter is loaded into read back as the training data's labels."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not _head_parameters(model) or not id2label:
        return None
    try:  # (keys set by hand may be strings, "0", "1", ...)
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    return [by_id[i] for i in range(len(by_id))] if set(by_id) == set(range(len(by_id))) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _aside(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.old"


def _new_temporary(directory: Path) -> Path:
    """An empty new sibling of ``directory``. os.mkdir gives it the mode of any new directory (the
    umask's), where mkdtemp's 0700 would lock other users out of the adapter."""
    while True:
        tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _recover(directory: Path) -> None:
    """Finish a swap that a killed process left half done: put the previous version back when the
    new one had not got into place, else delete it; and remove the temporaries of killed writes
    (mkdtemp named them with 8 of [a-z0-9_] before)."""
    aside = _aside(directory)
    if aside.is_dir():
        if directory.exists():
            try:
                shutil.rmtree(aside)
            except OSError as e:
                raise OSError(f"{aside}: the previous version of {directory}, which a save renamed "
                              f"aside, cannot be deleted ({e.strerror}: {e.filename}); delete it "
                              "to save again") from None
        else:
            os.replace(aside, directory)
    temporary = re.compile(re.escape(f".{directory.name}.tmp-") + "[a-z0-9_]{8}")
    for entry in directory.parent.iterdir():
        if temporary.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _carry_other_entries(directory: Path, tmp: Path) -> None:
    """Give the new version of ``directory`` its other entries, as hard links (no data copied)."""
    for entry in directory.iterdir():
        if entry.name in (WEIGHTS_NAME, CONFIG_NAME):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), tmp / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, tmp / entry.name)


def _keep_owner_and_mode(directory: Path, tmp: Path) -> None:
    """Give the new version of ``directory`` the old one's mode, owner and group, as far as this
    process may: a save by root into a user's folder, or by a member of a shared folder's group,
    must not leave a folder its owner can no longer write into."""
    shutil.copymode(directory, tmp)
    st = directory.stat()
    for path in (tmp, tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
        for uid in (st.st_uid, -1):  # changing the owner needs privileges; the group, membership
            try:
                os.chown(path, uid, st.st_gid)
                break
            except PermissionError:
                continue


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors for safetensors, which refuses two that share memory (a PEFT export of a tied
    embed_tokens / lm_head pair holds both): a later one sharing an earlier one's storage is
    copied."""
    out, storages = {}, set()
    for key, t in tensors.items():
        t = t.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in storages else t
        storages.add(ptr)
    return out


def _written_kind(config_text: str) -> str | None:
    """'tsqlora_ext' or 'PEFT' for an adapter config this module writes, else None."""
    try:
        meta = json.loads(config_text)
    except ValueError:
        return None
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        return "tsqlora_ext"
    return "PEFT" if isinstance(meta, dict) and "peft_type" in meta else None


def _write_dir_atomically(directory: Path, tensors: dict[str, torch.Tensor],
                          config: dict[str, Any], checksum_key: str | None) -> None:
    """Write WEIGHTS_NAME and CONFIG_NAME into ``directory`` so that no reader ever sees a
    half-written file or files of two versions (see the module docstring)."""
    # Resolved, so that a symlink to the directory stays and "." has a name and a parent.
    directory = Path(os.path.realpath(directory))
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    # save_adapter and export_peft write files of the same names: one must not silently replace
    # the other's adapter.
    kind, existing = ("PEFT" if checksum_key is None else "tsqlora_ext"), directory / CONFIG_NAME
    try:
        there = _written_kind(existing.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        there = None
    if there not in (None, kind):
        raise FileExistsError(f"{directory} holds a {there} adapter, which writing a {kind} one "
                              "would replace: write it into another folder, or delete that one first")
    cwd = Path.cwd()
    if cwd == directory or directory in cwd.parents:
        raise ValueError(f"{directory} holds the current working directory, which writing the "
                         "adapter would delete (the whole directory is replaced): write it into a "
                         "directory of its own")
    if directory.exists():
        # The folder is replaced whole (a rename), which a mount point refuses, and which would
        # replace a folder its owner made read-only (renaming needs only the parent writable).
        if os.path.ismount(directory):
            raise OSError(f"{directory} is a mount point, which cannot be replaced whole as the "
                          "adapter's folder is: write the adapter into a folder inside it")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory} is not writable, so its adapter is not replaced")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover(directory)
    tmp = _new_temporary(directory)
    try:
        save_file(_unshared(tensors), tmp / WEIGHTS_NAME)
        if checksum_key is not None:
            config = {**config, checksum_key: _sha256(tmp / WEIGHTS_NAME)}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # safetensors creates its file 0600; give it the mode of any new file, as the config has.
        shutil.copymode(tmp / CONFIG_NAME, tmp / WEIGHTS_NAME)
        if directory.exists():
            _carry_other_entries(directory, tmp)
            _keep_owner_and_mode(directory, tmp)
            os.replace(directory, _aside(directory))
        os.replace(tmp, directory)
    finally:
        # Delete the old version, or put it back when the new one did not get into place.
        try:
            _recover(directory)
        except OSError as e:
            if not directory.exists():
                raise
            # The new version is in place: the save did what it was asked.
            warnings.warn(str(e), stacklevel=3)


def _read_at(fd: int, directory: Path, name: str) -> bytes:
    """The file ``name`` of the folder open as ``fd`` (which is ``directory``); an error names the
    whole path, not the bare file name the open saw."""
    try:
        with open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=fd)) as f:
            return f.read()
    except OSError as e:
        e.filename = str(directory / name)
        raise


def _read_config(fd: int, directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    try:
        meta = json.loads(_read_at(fd, directory, CONFIG_NAME))
    except FileNotFoundError:
        raise FileNotFoundError(f"tsqlora_ext.load_adapter: {path} not found (is {directory} an "
                                "adapter written by save_adapter?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tsqlora_ext.load_adapter: {path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        hint = (" It is a PEFT adapter (written by export_peft?): load it with "
                "peft.PeftModel.from_pretrained." if isinstance(meta, dict) and "peft_type" in meta else "")
        raise ValueError(f"tsqlora_ext.load_adapter: {path} is not a tsqlora_ext adapter config "
                         f"(no \"format\": \"{FORMAT}\").{hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"tsqlora_ext.load_adapter: {path} has format_version "
                         f"{meta.get('format_version')!r}; this tsqlora_ext reads {FORMAT_VERSION}")
    for key in ("config", "ranks", "base_model", "weights_sha256"):
        if key not in meta:
            raise ValueError(f"tsqlora_ext.load_adapter: {path}: field {key!r} missing")
    _check_fields(meta, path)
    return meta


def _check_fields(meta: dict[str, Any], path: Path) -> None:
    """The fields' types, so that a hand-edited file fails naming the file and the field rather
    than with a bare KeyError or TypeError deep in the load."""
    def bad(field: str, want: str):
        raise ValueError(f"tsqlora_ext.load_adapter: {path}: {field} must be {want}")

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    for key in ("config", "ranks", "base_model"):
        if not isinstance(meta[key], dict):
            bad(repr(key), "an object")
    for name, rank in meta["ranks"].items():
        if not isinstance(rank, int) or isinstance(rank, bool):
            bad(f"ranks[{name!r}]", f"an integer, got {rank!r}")
    scaling = meta.get("scaling", {})
    if not isinstance(scaling, dict) or not all(number(v) for v in scaling.values()):
        bad("'scaling'", "an object of numbers")
    base = meta["base_model"]
    for kind in ("layers", "modules_to_save"):
        shapes = base.get(kind, {})
        if not isinstance(shapes, dict) or not all(
                isinstance(v, list) and all(isinstance(d, int) for d in v) for v in shapes.values()):
            bad(f"base_model[{kind!r}]", "an object of shapes (lists of integers)")
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        bad("'labels'", "a list of names, or null")
    if not isinstance(meta["weights_sha256"], str):
        bad("'weights_sha256'", "a string")


def _read_weights(fd: int, directory: Path, sha256: str) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    try:
        raw = _read_at(fd, directory, WEIGHTS_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(f"tsqlora_ext.load_adapter: {path} not found") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"tsqlora_ext.load_adapter: {path} does not match the checksum in "
                         f"{directory / CONFIG_NAME} (corrupted, or the two files come from "
                         "different saves)")
    try:
        return load_safetensors(raw)
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
        raise ValueError(f"tsqlora_ext.load_adapter: cannot read {path}: {e}") from None


def _current(directory: Path) -> Path:
    """Where the newest complete version of ``directory`` is: the folder itself, or the previous
    version a save renamed aside, when it is between its two renames or was killed there."""
    resolved = Path(os.path.realpath(directory))  # as _write_dir_atomically names the aside
    return _aside(resolved) if not resolved.exists() and _aside(resolved).is_dir() else directory


def _still_current(fd: int, directory: Path) -> bool:
    """Whether the folder open as ``fd`` is still the current version of ``directory``."""
    try:
        now = os.stat(_current(directory))
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


# How often a reader starts again when saves keep replacing the version it reads.
_READ_ATTEMPTS = 20


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(config, weights, the folder read) of one version of ``directory``. Both files are read
    through one handle on the folder, and a save swaps whole folders, so a save running meanwhile
    gives the old pair or the new one, never one file of each; a version deleted under the reader
    (the save's last step) is read again from the one that replaced it."""
    attempts = 0
    while True:
        attempts += 1
        source = _current(directory)
        try:
            fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            if attempts < _READ_ATTEMPTS and _current(directory).is_dir():
                continue  # replaced between the look and the open
            raise FileNotFoundError(f"tsqlora_ext.load_adapter: {source / CONFIG_NAME} not found "
                                    f"(is {directory} an adapter written by save_adapter?)") from None
        try:
            meta = _read_config(fd, source)
            return meta, _read_weights(fd, source, meta["weights_sha256"]), source
        except FileNotFoundError:
            if attempts == _READ_ATTEMPTS or _still_current(fd, directory):
                raise
        finally:
            os.close(fd)


def _check_fingerprint(saved: dict[str, Any], model: nn.Module, source: Path) -> None:
    here = fingerprint(model)
    where = f"tsqlora_ext.load_adapter: the adapter in {source}"
    if saved.get("class") != here["class"]:
        raise ValueError(f"{where} was saved from a {saved.get('class')} ({saved.get('model_type')}); "
                         f"this model is a {here['class']} ({here['model_type']})")
    for kind in ("layers", "modules_to_save"):
        s, h = saved.get(kind, {}), here[kind]
        missing, extra = sorted(set(s) - set(h)), sorted(set(h) - set(s))
        if missing or extra:
            raise ValueError(f"{where} does not fit this model's {kind}: in the adapter only "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, in the model only "
                             f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for name in h:  # model order, so the first mismatch named is the first layer
            if list(s[name]) != list(h[name]):
                dims = "[out, in]" if kind == "layers" else "shape"
                raise ValueError(f"{where} does not fit this model: {name} has {dims} "
                                 f"{s[name]} in the adapter and {h[name]} in the model "
                                 "(another model size?)")


# ---- save / load --------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the active adapter components and the trainable head of a wrapped model to ``directory``."""
    model = _uncompiled(model)
    _require_wrapped(model, "save_adapter")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scaling: dict[str, float] = {}
    for name, layer in adapted_layers(model):
        active = layer.active_indices()
        ranks[name] = int(active.numel())
        scaling[name] = layer.scaling
        if ranks[name] == 0:
            continue
        tensors[f"{name}.active"] = active
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().index_select(0, active)
        tensors[f"{name}.lora_E"] = layer.lora_E.detach().index_select(0, active)
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().index_select(1, active)
    tensors.update({n: p.detach() for n, p in _head_parameters(model).items()})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tsqlora_ext_version": _build_config.VERSION,
        "config": model.tsqlora_config.to_dict(),
        "ranks": ranks,
        "scaling": scaling,
        "base_model": fingerprint(model),
        "labels": _head_labels(model),
    }
    _write_dir_atomically(Path(directory), tensors, meta, checksum_key="weights_sha256")


def load_adapter(model: nn.Module, directory: str | os.PathLike, verbose: bool = False) -> nn.Module:
    """Load an adapter written by ``save_adapter`` into ``model`` and return the model.

    ``model`` is either wrapped already (with a config giving the same layers and scaling) or a plain
    transformers model of the same architecture, which is then wrapped with the saved config.
    Components outside the saved active sets keep the values they have in ``model``.
    """
    given, model = model, _uncompiled(model)
    meta, tensors, directory = _read_adapter(Path(directory))
    if is_wrapped(model):
        _load_into(model, directory, meta, tensors)
        return given
    config = TsqLoRAConfig.from_dict(meta["config"], source=str(directory / CONFIG_NAME))
    wrap(model, config, verbose=verbose)
    try:
        _load_into(model, directory, meta, tensors, wrapped_here=True)
    except BaseException:
        # A failed load leaves the caller's model as it was given, down to its module and
        # Parameter objects (which an optimizer may hold).
        unwrap(model, merge=False)
        raise
    return given


@torch.no_grad()
def _load_into(model: nn.Module, directory: Path, meta: dict[str, Any],
               tensors: dict[str, torch.Tensor], wrapped_here: bool = False) -> None:
    """Check everything first, then copy: an adapter that fails a check changes nothing.
    ``wrapped_here``: the model was wrapped with the adapter's own config."""
    _check_fingerprint(meta["base_model"], model, directory)
    weights_path = directory / WEIGHTS_NAME

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in tensors:
            raise ValueError(f"tsqlora_ext.load_adapter: {weights_path} has no tensor {key!r}")
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"tsqlora_ext.load_adapter: {weights_path}: {key!r} has shape "
                             f"{list(t.shape)}, expected {list(shape)}")
        return t

    saved_scaling = meta.get("scaling", {})
    plan = []
    for name, layer in adapted_layers(model):
        if name not in meta["ranks"]:
            raise ValueError(f"tsqlora_ext.load_adapter: {directory / CONFIG_NAME}: 'ranks' has no "
                             f"entry for the adapted layer {name}")
        rank = meta["ranks"][name]
        if not 0 <= rank <= layer.r_max:
            raise ValueError(f"tsqlora_ext.load_adapter: {name} has rank {rank} in the adapter but "
                             f"r_max {layer.r_max} in this model")
        if name in saved_scaling and abs(saved_scaling[name] - layer.scaling) > 1e-12 * abs(layer.scaling):
            fix = (f"the config in {directory / CONFIG_NAME} gives another: was it edited?" if wrapped_here else
                   "wrap the model with the adapter's config or pass it unwrapped")
            raise ValueError(f"tsqlora_ext.load_adapter: {name} has scaling {saved_scaling[name]:g} "
                             f"(lora_alpha / r_init) in the adapter but {layer.scaling:g} in this "
                             f"model; {fix}")
        if rank == 0:
            plan.append((layer, torch.zeros(0, dtype=torch.long), None))
            continue
        active = get(f"{name}.active", (rank,)).to(torch.long)
        if int(active.min()) < 0 or int(active.max()) >= layer.r_max or bool((active[1:] <= active[:-1]).any()):
            raise ValueError(f"tsqlora_ext.load_adapter: {weights_path}: {name}.active must be sorted "
                             f"distinct ids in [0, r_max={layer.r_max}), got {active.tolist()}")
        factors = (get(f"{name}.lora_A", (rank, layer.in_features)), get(f"{name}.lora_E", (rank,)),
                   get(f"{name}.lora_B", (layer.out_features, rank)))
        plan.append((layer, active, factors))
    head = [(p, get(name, tuple(p.shape))) for name, p in _head_parameters(model).items()]

    for layer, active, factors in plan:
        was_merged = layer.merged
        layer.unmerge()
        if factors is not None:
            a, e, b = factors
            idx = active.to(layer.lora_A.device)
            layer.lora_A.index_copy_(0, idx, a.to(layer.lora_A.device, layer.lora_A.dtype))
            layer.lora_E.index_copy_(0, idx, e.to(layer.lora_E.device, layer.lora_E.dtype))
            layer.lora_B.index_copy_(1, idx, b.to(layer.lora_B.device, layer.lora_B.dtype))
        layer.set_active(active)
        if was_merged:
            layer.merge()
    for p, t in head:
        p.copy_(t.to(p.device, p.dtype))
    labels, config = meta.get("labels"), getattr(model, "config", None)
    if head and labels and len(labels) == len(getattr(config, "id2label", None) or ()):
        # The head's outputs are the adapter's classes now, whatever the base config called them.
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}


# ---- PEFT export --------------------------------------------------------------------------------
# The modules PEFT's model class for a task type adds to modules_to_save (peft_model.py:
# PeftModelForSequenceClassification and friends), frozen head or not; loading then needs their
# tensors in the file.
_PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}


def _peft_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


def _tied_partners(model: nn.Module, trained: list[str]) -> list[str]:
    """Modules outside ``trained`` (and outside every adapted layer) that hold one of its
    parameters: GPT-2's input embeddings when lm_head trains, since the two share one weight.
    Training here moves both; PEFT copies only the modules it is told of, so a partner left out
    would keep the base's weight there."""
    shared = {id(p) for name in trained for p in model.get_submodule(name).parameters()}
    skip = [*trained, *(name for name, _ in adapted_layers(model))]
    return [name for name, m in model.named_modules()
            if name and not _inside(name, skip)
            and any(id(p) in shared for p in m.parameters(recurse=False))]


def _peft_saved_modules(model: nn.Module, task_type: str | None, trained: list[str]) -> list[str]:
    """Names of the modules PEFT wraps in a ModulesToSaveWrapper on load: every module whose name
    ends with an entry of ``trained`` or of the task type's heads (PEFT's own matching), the
    outermost one where they nest."""
    wanted = [*trained, *_PEFT_TASK_HEADS.get(task_type, ())]
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(w) for w in wanted) and \
                not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


@torch.no_grad()
def export_peft(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter of a wrapped model as a standard PEFT LoRA adapter in ``directory``."""
    model = _uncompiled(model)
    _require_wrapped(model, "export_peft")
    config: TsqLoRAConfig = model.tsqlora_config
    state = model.tsqlora_state
    r_default = config.r_init
    prefix = "base_model.model."
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in adapted_layers(model):
        rank = layer.rank
        if rank == 0:
            continue
        active = layer.active
        a = layer.lora_A.index_select(0, active)
        b = layer.lora_B.index_select(1, active) * layer.lora_E.index_select(0, active)
        tensors[f"{prefix}{name}.lora_A.weight"] = a
        tensors[f"{prefix}{name}.lora_B.weight"] = b
        targets.append(name)
        if rank != r_default:
            # PEFT scales by alpha / r; this alpha keeps our fixed scaling lora_alpha / r_init.
            rank_pattern[name] = rank
            alpha_pattern[name] = config.lora_alpha * rank / r_default
    if not targets:
        raise ValueError("tsqlora_ext.export_peft: every adapted layer is at rank 0; a PEFT LoRA "
                         "adapter needs at least one layer with rank >= 1")
    task_type = _peft_task_type(model)
    trained = list(state.modules_to_save)
    trained += _tied_partners(model, trained)
    # A wrapped module's whole state dict, as PEFT loads it; heads frozen here are written too, at
    # the base's values, since PEFT's task type wraps them anyway.
    for module_name in _peft_saved_modules(model, task_type, trained):
        for key, t in model.get_submodule(module_name).state_dict().items():
            tensors[f"{prefix}{module_name}.{key}"] = t
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "r": r_default,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": trained or None,
        "fan_in_fan_out": bool(state.conv1d),
        "bias": "none",
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    held = [p for name in trained for p in model.get_submodule(name).parameters()]
    if len({id(p) for p in held}) < len(held):
        # A weight tied across trained modules (embed_tokens and lm_head): PEFT keeps its two
        # copies tied only when told (it warns otherwise).
        peft_config["ensure_weight_tying"] = True
    _write_dir_atomically(Path(directory), tensors, peft_config, checksum_key=None)
