"""Models split across devices: Hugging Face checkpoints loaded with a `device_map`.

`lenslab.load_model(name, device_map=..., max_memory=..., offload_folder=...)` lands here (through
`lenslab._hf`). transformers and accelerate place the weights (whole GPUs, CPU RAM, disk), then
TransformerLens's `TransformerBridge` wraps the placed model, with HookedTransformer hook names and
no weight processing, as for every bridge lenslab builds.

TransformerLens 3 refuses offloaded weights (a `disk` entry, or `cpu` entries beside GPUs, which
accelerate also offloads): accelerate brings an offloaded module's weights in from a hook on *that*
module's forward, and bridge components read some weights without calling it (the normalization
bridge computes from `weight` itself; the unembedding bridge adds a bias). lenslab therefore moves
the onloading one level up: accelerate's hooks on offloaded modules are removed, and a hook on the
bridge component that holds them (a block, the embedding, the final norm, the unembedding) brings
all their weights to the execution device for that component's forward and sends them back after.
Activations move to each component's device; the bridge's outputs come back on the device of the
input embedding (`lenslab.toolbox.model_device`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lenslab._device import resolve_device
from lenslab._errors import LenslabError

logger = logging.getLogger(__name__)

# accelerate's named strategies for device_map
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Offloaded:
    """The weights of one module that accelerate offloaded (meta placeholders, values elsewhere)."""

    module: torch.nn.Module
    names: list[str]
    weights_map: object  # accelerate's PrefixedDataset: name -> tensor (CPU RAM or a disk memmap)
    device: torch.device
    zeros: dict[str, tuple] = field(default_factory=dict)  # name -> (shape, dtype): tensors the bridge added


def check_placement(device_map, max_memory, offload_folder) -> None:
    """Reject placements that cannot work before anything loads, naming the fix."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise LenslabError(
                "max_memory and offload_folder only apply with a device_map; pass device_map='auto' "
                "(or a dict of module name -> device)"
            )
        return
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise LenslabError(
                f"device_map={device_map!r} is not one of {', '.join(map(repr, STRATEGIES))}; or pass a dict "
                "of module name -> device ('cuda:0', 0, 'cpu', 'disk')"
            )
    elif isinstance(device_map, dict):
        if not device_map:
            raise LenslabError("device_map is empty; pass 'auto' or a dict of module name -> device")
        for key, value in device_map.items():
            check_target(key, value)
    else:
        raise LenslabError(f"device_map must be 'auto' or a dict of module name -> device, got {device_map!r}")
    if max_memory is not None and not isinstance(max_memory, dict):
        raise LenslabError(f"max_memory must be a dict such as {{0: '20GiB', 'cpu': '60GiB'}}, got {max_memory!r}")


def check_target(key: str, value) -> None:
    """One device_map entry: an existing GPU (index or 'cuda:N'), 'cpu', 'mps' or 'disk'."""
    if isinstance(value, str) and value in ("disk", "cpu"):
        return
    if isinstance(value, str) and value == "meta":
        raise LenslabError(f"device_map[{key!r}]='meta' holds no weights; put the module on a GPU, 'cpu' or 'disk'")
    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        raise LenslabError(f"device_map[{key!r}]={value!r} is not a device; use a GPU index, 'cuda:N', 'cpu' or 'disk'")
    resolve_device(f"cuda:{value}" if isinstance(value, int) else value)


def check_coverage(device_map: dict, hf_config) -> None:
    """Every weight of the model must fall under some device_map key ('' covers everything)."""
    from accelerate import init_empty_weights  # deferred: accelerate loads only for split models
    from transformers import AutoModelForCausalLM  # deferred: transformers loads only for Hugging Face checkpoints

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    keys = list(device_map)
    missing = []
    for name, _ in skeleton.named_parameters():
        if not any(k == "" or name == k or name.startswith(k + ".") for k in keys):
            module = name.rsplit(".", 1)[0]
            if module not in missing:
                missing.append(module)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise LenslabError(
            f"device_map leaves these modules on no device: {shown}; add an entry for each (a prefix such as "
            "'model.layers' covers all its sub-modules) or pass device_map='auto'"
        )


def load_dispatched(folder: Path, hf_config, arch: str, tokenizer, dtype, device_map, max_memory, offload_folder):
    """A `TransformerBridge` over the HF model in `folder`, placed by accelerate per `device_map`."""
    from accelerate.hooks import remove_hook_from_module  # deferred: accelerate loads only for split models
    from transformer_lens.model_bridge import (
        TransformerBridge,  # deferred: transformer_lens loads only when a model is built
    )
    from transformers import AutoModelForCausalLM  # deferred: transformers loads only for Hugging Face checkpoints

    if isinstance(device_map, dict):
        check_coverage(device_map, hf_config)
    kwargs = dict(dtype=dtype, device_map=device_map, attn_implementation="eager", local_files_only=True)
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (ValueError, RuntimeError, KeyError) as exc:
        msg = str(exc)
        if "offload" in msg.lower() and offload_folder is None:
            raise LenslabError(
                f"the model does not fit in max_memory={max_memory}: some weights would go to disk, and no "
                "offload_folder was given; pass offload_folder=<a folder>, or raise max_memory"
            ) from exc
        raise LenslabError(
            f"transformers could not place {folder} with device_map={device_map!r}: {msg[:300]}"
        ) from exc
    hf_model.eval()
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [arch]
    placed = dict(getattr(hf_model, "hf_device_map", None) or {})
    offloaded = _take_offloaded(hf_model, remove_hook_from_module)
    # TransformerBridge rejects offload targets it sees in hf_device_map; lenslab onloads them itself.
    with _hidden_device_map(hf_model):
        try:
            bridge = TransformerBridge.boot_transformers(
                str(folder), hf_model=hf_model, dtype=dtype, tokenizer=tokenizer
            )
        except NotImplementedError as exc:
            if not offloaded or "meta" not in str(exc):
                raise
            raise LenslabError(
                f"{arch}'s TransformerBridge copies some weights when it is built (a fused QKV projection is "
                f"split), and offloaded weights ({len(offloaded)} modules) cannot be copied; give max_memory room "
                "for every weight on a device (no 'disk', and no 'cpu' beside GPUs), or use an architecture with "
                "separate q/k/v projections (Llama, Mistral, Qwen, OLMoE, ...)"
            ) from exc
        except Exception as exc:
            raise LenslabError(
                f"TransformerLens's TransformerBridge could not wrap {folder} ({arch}) placed with "
                f"device_map={device_map!r}: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    if getattr(bridge.cfg, "original_architecture", None) is None:
        bridge.cfg.original_architecture = arch
    _adopt_bridge_tensors(offloaded)
    _install_onload_hooks(bridge, offloaded)
    _check_no_stray_meta(bridge, offloaded)
    embed_device = execution_device_of(hf_model.get_input_embeddings(), offloaded)
    bridge.cfg.device = str(embed_device)
    bridge.cfg.n_devices = len({str(v) for v in placed.values() if v != "disk"}) or 1
    bridge.lenslab_device_map = placed
    return bridge


def execution_device_of(module: torch.nn.Module, offloaded: list[Offloaded]) -> torch.device:
    """Where `module` computes: its offload record's device, else its first real parameter's."""
    for rec in offloaded:
        if rec.module is module:
            return rec.device
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _take_offloaded(hf_model, remove_hook) -> list[Offloaded]:
    """Record every module accelerate offloaded and remove accelerate's hook from it."""
    out = []
    for module in hf_model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False) or getattr(hook, "weights_map", None) is None:
            continue
        tensors = list(module.named_parameters(recurse=False))
        if hook.offload_buffers:
            tensors += [
                (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
            ]
        names = [n for n, t in tensors if t.device.type == "meta"]  # tied weights already on a device stay put
        out.append(Offloaded(module, names, hook.weights_map, torch.device(hook.execution_device)))
        remove_hook(module)
    return out


@contextlib.contextmanager
def _hidden_device_map(hf_model):
    placed = hf_model.__dict__.pop("hf_device_map", None)
    try:
        yield
    finally:
        if placed is not None:
            hf_model.hf_device_map = placed


def _adopt_bridge_tensors(offloaded: list[Offloaded]) -> None:
    """Tensors the bridge added to offloaded modules (the unembedding's zero bias) are created on
    'meta' beside their weight; they are zeros, and onload with the rest."""
    for rec in offloaded:
        for name, t in list(rec.module.named_parameters(recurse=False)):
            if t.device.type == "meta" and name not in rec.names:
                if name != "bias":
                    raise LenslabError(
                        f"the bridge added a tensor {name!r} with no stored value to an offloaded module "
                        f"({type(rec.module).__name__}); load without offload (more max_memory)"
                    )
                rec.zeros[name] = (tuple(t.shape), t.dtype)


def _onload(rec: Offloaded) -> None:
    from accelerate.utils import set_module_tensor_to_device  # deferred: accelerate loads only for split models

    for name in rec.names:
        set_module_tensor_to_device(rec.module, name, rec.device, value=rec.weights_map[name])
    for name, (shape, dtype) in rec.zeros.items():
        set_module_tensor_to_device(rec.module, name, rec.device, value=torch.zeros(shape, dtype=dtype))


def _offload(rec: Offloaded) -> None:
    from accelerate.utils import set_module_tensor_to_device  # deferred: accelerate loads only for split models

    for name in [*rec.names, *rec.zeros]:
        set_module_tensor_to_device(rec.module, name, "meta")


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _install_onload_hooks(bridge, offloaded: list[Offloaded]) -> None:
    """Hook each top bridge component (block, embed, final norm, unembed, ...) that holds offloaded
    modules: its forward onloads all their weights and moves its inputs to their device."""
    if not offloaded:
        return
    tops = []
    for child in bridge.children():
        if isinstance(child, torch.nn.ModuleList):
            tops += list(child)
        else:
            tops.append(child)
    left = list(offloaded)
    for top in tops:
        inside = {id(m) for m in top.modules()}
        recs = [r for r in left if id(r.module) in inside]
        if recs:
            left = [r for r in left if id(r.module) not in inside]
            _hook(top, recs)
    for rec in left:  # modules no bridge component wraps (HF-internal helpers): onload on their own forward
        _hook(rec.module, [rec])


def _hook(module: torch.nn.Module, recs: list[Offloaded]) -> None:
    device = recs[0].device

    def pre(mod, args, kwargs):
        for rec in recs:
            _onload(rec)
        return _to(args, device), _to(kwargs, device)

    def post(mod, args, kwargs, output):
        for rec in recs:
            _offload(rec)
        return output

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True, always_call=True)


def _check_no_stray_meta(bridge, offloaded: list[Offloaded]) -> None:
    covered = {(id(r.module), n) for r in offloaded for n in [*r.names, *r.zeros]}
    for module_name, module in bridge.named_modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.device.type == "meta" and (id(module), name) not in covered:
                raise LenslabError(
                    f"{module_name}.{name} is on the 'meta' device with no stored value after placement; "
                    "load with more max_memory or a device_map that keeps this module on a device"
                )
