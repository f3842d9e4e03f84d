"""The options of a streaming merge (`lorakit merge`), as a config that a YAML file, flags or a dict fill:

    report = merge(MergeConfig.from_yaml("merge.yaml"))
    report = merge(MergeConfig(adapter=["runs/a/adapter"], output="merged", weights=[0.5]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lorakit.options import OptionError, Options, finite, option

if TYPE_CHECKING:
    from lorakit.merge.streaming import MergeReport


@dataclass
class MergeConfig(Options):
    """Every option of `lorakit merge`; `merge` runs it with `merge_checkpoint`."""

    adapter: list[str] = option(help="Adapter directory; repeat to merge several.", commas=False)
    output: str = option(help="Directory for the merged model.", flags=("--output", "-o"))
    model: str = option("default", help="Base model: local directory, .gguf file or 'default' (embedded "
                                        "SmolLM2-135M-Instruct).")
    weights: list[float] | None = option(None, help="Weight per adapter, comma-separated (e.g. 0.7,0.3) "
                                                    "(default: 1 each).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = option("auto", help="Output dtype; auto keeps "
                                                                                   "the base's.")
    max_shard_size: str = option("2GB", help="Largest output shard, e.g. 2GB, 500MB.")
    verify: bool = option(True, help="Re-read the output and check every tensor.")
    verify_outputs: bool = option(False, help="Also compare logits with base + adapter in memory (loads both "
                                              "models).")
    overwrite: bool = option(False, help="Replace an existing output directory.")

    def validate(self) -> None:
        if not self.adapter:
            raise OptionError("adapter", "at least one adapter directory", self.adapter)
        for weight in self.weights or []:
            if not finite(weight):
                raise OptionError("weights", "finite numbers", self.weights)


def merge(config: MergeConfig, *, progress: bool = False) -> MergeReport:
    """Merge `config.adapter` into `config.model` and write `config.output` (see `merge_checkpoint`)."""
    from lorakit.merge.streaming import merge_checkpoint

    return merge_checkpoint(config.model, config.adapter, config.output, weights=config.weights,
                            dtype=config.dtype, max_shard_size=config.max_shard_size, verify=config.verify,
                            verify_outputs=config.verify_outputs, overwrite=config.overwrite,
                            progress=progress)
