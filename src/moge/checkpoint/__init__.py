"""Checkpoints: the released Pangu Pro MoE layout, atomic and confined file I/O, and training state.

One job per module:

* :mod:`.layout` -- released tensor names and ``config.json`` keys <-> our stacked-expert form (pure).
* :mod:`.io` -- atomic writes, paths confined to the checkpoint, safetensors shards, hashing.
* :mod:`.pretrained` -- whole models: :func:`load_pretrained`, :func:`save_pretrained` (config + state
  dict), :func:`save_model` (a model object).
* :mod:`.training_state` -- optimizer / RNG state, the manifest and the atomic commit protocol that
  ``moge train`` uses.
* :mod:`.hf_files` -- ``generation_config.json`` and the tokenizer files transformers' tools read.
* :mod:`.convert` -- the ``moge convert`` command.
"""

from .hf_files import write_generation_config, write_tokenizer_config
from .io import (CheckpointCorruptError, CheckpointError, atomic_write, confined, fsync_dir, parse_size, sha256_file,
                 write_json)
from .layout import (RELEASED_ARCHITECTURE, RELEASED_MODEL_TYPE, from_published_state_dict, released_config_dict,
                     to_published_state_dict)
from .pretrained import (load_into, load_pretrained, load_state_dict, model_config, read_config, save_model,
                         save_pretrained)
from .reading import CONFIG_NAME, TOKENIZER_NAME, resolve_dtype


__all__ = [
    "CONFIG_NAME", "CheckpointCorruptError", "CheckpointError", "RELEASED_ARCHITECTURE", "RELEASED_MODEL_TYPE",
    "TOKENIZER_NAME", "atomic_write", "confined", "from_published_state_dict", "fsync_dir", "load_into",
    "load_pretrained", "load_state_dict", "model_config", "parse_size", "read_config", "released_config_dict",
    "resolve_dtype", "save_model", "save_pretrained", "sha256_file", "to_published_state_dict",
    "write_generation_config", "write_json", "write_tokenizer_config",
]
