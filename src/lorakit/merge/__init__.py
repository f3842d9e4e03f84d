"""Merging LoRA updates into weights, in three groups that import only downward:

- pure tensor maths, which the layers import: `delta` (ΔW in each weight layout, DoRA), `combine` (weighted
  combinations of factors);
- operations on a live model: `live` (merge, unmerge, disable), `weighted` (`add_weighted_adapter`);
- the on-disk streaming merge: `adapter_file`, `plan`, `streaming`, `verify`.
"""
