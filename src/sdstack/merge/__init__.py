"""Checkpoint merging for SD 1.x: merge methods, block weights (and the streaming engine).

- :mod:`sdstack.merge.methods`: the merge methods (weighted sum, add difference, sum twice,
  triple sum, train difference, TIES, DARE, slerp) as small pure float32 functions,
  registered by name in :data:`MERGE_METHODS`; :func:`merge_tensor` merges one key.
- :mod:`sdstack.merge.blocks`: the 26 merge-block values (``--alpha-blocks``), their presets,
  and :func:`alpha_of_key` (the multiplier of one checkpoint key).

Names are imported on first use, so ``import sdstack.merge`` costs nothing; the block
parser does not import torch. :class:`MergeError` is the base of every merge error.
"""

from __future__ import annotations

from sdstack.errors import SdstackError
from sdstack.lazy import lazy_exports


class MergeError(SdstackError):
    """A merge that cannot be done as asked: bad method, option, block list or tensors."""


_EXPORTS = {
    "MERGE_METHODS": "methods",
    "MergeMethod": "methods",
    "UnknownMergeMethodError": "methods",
    "dare_keep_mask": "methods",
    "merge_tensor": "methods",
    "resolve_options": "methods",
    "MERGE_BLOCK_PRESETS": "blocks",
    "MergeBlockError": "blocks",
    "alpha_of_key": "blocks",
    "check_merge_blocks": "blocks",
    "parse_merge_blocks": "blocks",
    "MergeSettings": "settings",
    "merge_checkpoints": "stream",
    "merge_state_dicts": "stream",
    "merged_tensors": "stream",
    "run_recipe": "chain",
    "load_merged": "patch",
    "apply_merge": "patch",
    "remove_merge": "patch",
    "parse_merge_spec": "patch",
}

__all__ = sorted([*_EXPORTS, "MergeError"])


__getattr__, __dir__ = lazy_exports("sdstack.merge", _EXPORTS, globals())
