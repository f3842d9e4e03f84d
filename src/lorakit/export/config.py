"""The options of `lorakit export`, as a config that a YAML file, flags or a dict fill:

    report = export(ExportConfig(output="model.gguf", adapter=["runs/x/adapter"], type="q8_0"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lorakit.options import OptionError, Options, finite, option

if TYPE_CHECKING:
    from lorakit.export.writer import ExportReport

GgufType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]


@dataclass
class ExportConfig(Options):
    """Every option of `lorakit export`; `export` runs it."""

    output: str = option(help="The .gguf file to write.", flags=("--output", "-o"))
    format: Literal["gguf"] = option("gguf", help="Output format.")
    model: str = option("default", help="Base model (or a merged model): local directory, .gguf file or "
                                        "'default' (embedded SmolLM2-135M-Instruct).")
    adapter: list[str] | None = option(None, help="Adapter directory to merge in; repeat for several. None: "
                                                  "export --model as it is.", commas=False)
    weights: list[float] | None = option(None, help="Weight per adapter, comma-separated (e.g. 0.7,0.3) "
                                                    "(default: 1 each).")
    type: GgufType = option("f16", help="Tensor type of the matrices (vectors stay f32); q* are llama.cpp's "
                                        "block quantizations.")
    adapter_only: bool = option(False, help="Write the one --adapter as a GGUF LoRA adapter (llama.cpp "
                                            "--lora) instead of a merged model.")
    overwrite: bool = option(False, help="Replace an existing output file.")

    def validate(self) -> None:
        if self.adapter_only and (len(self.adapter or []) != 1 or self.weights):
            raise OptionError("adapter_only", "exactly one --adapter and no --weights", self.adapter)
        for weight in self.weights or []:
            if not finite(weight):
                raise OptionError("weights", "finite numbers", self.weights)


def export(config: ExportConfig, *, progress: bool = False) -> ExportReport:
    """Write the GGUF file `config` describes: a merged model, or with `adapter_only` a LoRA adapter."""
    from lorakit.export.adapter import export_adapter_gguf
    from lorakit.export.model import export_gguf

    if config.adapter_only:
        return export_adapter_gguf(config.model, config.adapter[0], config.output, type=config.type,
                                   overwrite=config.overwrite, progress=progress)
    return export_gguf(config.model, config.output, config.adapter or [], weights=config.weights,
                       type=config.type, overwrite=config.overwrite, progress=progress)
